"""The sections of the build configuration (pydantic models, one per stage or concern); see :mod:`mole.config`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config section: unknown keys refused, assignments validated, no booleans where counts go."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _counts_are_not_booleans(cls, data: Any) -> Any:
        """Refuse ``true``/``false`` for an integer field (pydantic would read them as 1 and 0)."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and field.annotation in (int, int | None):
                    raise ValueError(f"{name}: expected an integer, got {str(data[name]).lower()}")
        return data


class BaseModelConfig(Section):
    """Which base causal LM to build on (see mole.base.resolve_base)."""

    name: str = Field("smollm2-135m-instruct", min_length=1)
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|auto|mps|cuda(:\d+)?)$")


class DataConfig(Section):
    """Where the domain data comes from and how it is split (stage ``prepare``)."""

    source: str = Field("demo", min_length=1, description="'demo', a file, a dir of .txt, or a HF dataset id")
    eval_source: str | None = None
    hf_split: str = "train"
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_rows: int | None = Field(None, ge=1)
    demo_rows_per_skill: int = Field(200, ge=1)
    out_dir: str = "data/prepared"


class ClusterConfig(Section):
    """Embedding and k-means of the training rows (stage ``cluster``)."""

    embedder: Literal["minilm", "tfidf", "base"] = "minilm"
    k: int | None = Field(None, ge=1, strict=True, description="fixed number of clusters; null = choose automatically")
    k_min: int = Field(1, ge=1, description="smallest k tried (1: no mixture is a possible answer)")
    k_max: int = Field(10, ge=2)
    k_rule: Literal["heldout_lm", "silhouette"] = Field(
        "heldout_lm",
        description="heldout_lm: the first k the next one does not beat by k_tolerance in the held-out loss of "
        "per-cluster unigram LMs; silhouette: the k of best silhouette",
    )
    k_tolerance: float = Field(
        0.0025, ge=0.0, lt=1.0, description="relative held-out gain a further cluster must bring"
    )
    k_gain_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="... and at least this fraction of the first split's gain (diminishing returns)",
    )
    refine: bool = Field(True, description="refine the clusters by their unigram LMs (rows move to the best one)")
    lm_smoothing: float = Field(1000.0, gt=0.0, description="Dirichlet smoothing mass of the k rule's unigram LMs")
    min_cluster_size: int = Field(8, ge=1)
    balanced: bool = False
    n_init: int = Field(10, ge=1)
    silhouette_sample: int = Field(2000, ge=100)
    tfidf_dim: int = Field(64, ge=2)
    batch_size: int = Field(64, ge=1)
    out_dir: str = "data/clusters"

    @model_validator(mode="after")
    def _check_range(self) -> ClusterConfig:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must be <= k_max ({self.k_max})")
        return self

    def min_rows(self) -> int:
        """Fewest training rows that can give the requested clusters their minimum size."""
        return (self.k if self.k is not None else self.k_min) * self.min_cluster_size


class LoraSection(Section):
    """LoRA options under peft's own names; ``to_peft()`` builds the ``peft.LoraConfig``."""

    r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)

    @property
    def scale(self) -> float:
        """The LoRA scaling s = alpha / r."""
        return self.lora_alpha / self.r

    def to_peft(self):  # noqa: ANN201 - peft is imported lazily to keep config import light
        """The equivalent ``peft.LoraConfig`` for a causal LM."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


GALLERY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # an expert's name in the gallery (mole add-expert --name)


class ExpertsConfig(Section):
    """One LoRA expert per cluster, plus the multitask LoRA baseline (stage ``train-experts``)."""

    lora: LoraSection = LoraSection()
    steps: int = Field(15, ge=1, description="optimizer steps per expert on its own cluster")
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(64, ge=8)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(2, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(10, ge=1)
    mode: Literal["separate", "packed"] = Field(
        "separate", description="separate: one run per expert; packed: all experts in one run over one base"
    )
    shared: Literal["none", "seed", "residual", "cotrained"] = Field(
        "cotrained",
        description="a shared LoRA on all rows: none; seed (trained first, each expert starts as a copy of it, "
        "BTX-style, and the MoLE mixes the branched experts); residual (trained first, experts train on top of "
        "it, frozen, and the MoLE applies it to every token plus the routed top-k); cotrained (the shared LoRA "
        "and all experts in one run of mixed batches, each row through the shared adapter and its cluster's "
        "expert; the MoLE applies it as residual does)",
    )
    expert_lr_scale: float = Field(
        0.25,
        gt=0,
        le=1,
        description="cotrained: the experts' learning rate as a fraction of experts.lr (the shared "
        "adapter's); an expert is stepped from the few rows of its cluster in a batch, so its steps are noisier",
    )
    sink_tokens: int = Field(
        0,
        ge=0,
        description="cotrained: the first N tokens of every sequence go through the shared adapter alone, in "
        "training and in the MoLE (no routed expert): a router cannot tell a sequence's cluster from its first "
        "token, and every later token attends to it (the attention sink), so an expert chosen there by the row's "
        "cluster in training and by the router at inference computes it differently. 1 helped realdev and cost "
        "the demo corpus 4 of 60 exact answers (README, 'Does the mixture beat one LoRA?'); 0: every token routed",
    )
    first_gate: bool = Field(
        False,
        description="cotrained, with router.first_gate: each row's first token trains through the expert a "
        "first-token gate fitted on the rows picks (as the MoLE will route it), not through the row's own",
    )
    shared_steps: int = Field(
        45,
        ge=1,
        description="optimizer steps of the shared LoRA (all rows); cotrained: the run's steps beyond the "
        "experts' (the run takes shared_steps + k * steps)",
    )
    shared_update: Literal["auto", "always"] = Field(
        "auto",
        description="incremental builds: always fine-tune the shared adapter on the changed rows; auto: only when "
        "rows of kept clusters changed (rows of new kinds only are learned by their new experts, on the shared "
        "adapter as it is, so the kept experts' skills stay where they were)",
    )
    multitask_baseline: bool = True
    multitask_steps: int | None = Field(
        None,
        ge=1,
        description="steps of the multitask baseline; null = the training tokens of the whole MoLE build in "
        "steps of its batch size (shared + experts + the joint phase when it trains the experts)",
    )
    multitask_r: int | None = Field(
        None, ge=1, description="rank of the multitask baseline; null = the rank MoLE applies per token"
    )
    gallery: list[Annotated[str, Field(pattern=GALLERY_NAME)]] = Field(
        default_factory=list,
        description="experts of the workspace's gallery (mole add-expert) that join the bank beside the trained "
        "ones, by name: never trained by the build; their gate rows are warm-started from the rows given to "
        "add-expert --rows, else from the train rows each serves better than the row's own expert",
    )
    out_dir: str = "artifacts/experts"
    baseline_dir: str = "artifacts/baselines/multitask_lora"


class RouterConfig(Section):
    """Token router and joint router + expert fine-tuning (stage ``train-router``)."""

    top_k: int = Field(1, ge=1)
    routing: Literal["token_topk", "cluster"] = "token_topk"
    pool: Literal["token", "prefix"] = Field(
        "token",
        description="token: each token is routed by its own gate logits; prefix: by the running mean of the gate "
        "logits over the sequence so far (causal: decoding routes as training did)",
    )
    path: Literal["auto", "dense", "sparse"] = "auto"
    first_gate: bool = Field(
        True,
        description="route every sequence's first token, in every block, by a gate fitted on its embedding to the "
        "rows' experts (token routing only; off with experts.sink_tokens, whose first tokens take no expert)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model's blocks in mole predict (same outputs; pays off on long generations, "
        "compiling takes minutes on CPU)",
    )
    warm_start: bool = True
    warm_start_rows: int = Field(192, ge=1)
    warm_start_method: Literal["auto", "logistic", "means"] = Field(
        "auto",
        description="gate init: logistic regression of a token's cluster, nearest cluster mean, or auto (the one "
        "with the lower LM loss on a held-out quarter of the warm-start rows)",
    )
    warm_start_c: float = Field(0.01, gt=0, description="inverse L2 strength of the logistic warm start")
    warm_start_tokens: int = Field(16384, ge=1, description="tokens sampled for the logistic warm start")
    steps: int = Field(20, ge=0, description="joint router + expert steps")
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0, description="router (gate) learning rate")
    expert_lr: float = Field(1e-4, ge=0, description="expert learning rate in the joint phase")
    freeze_experts: bool = False
    aux_loss_coef: float = Field(0.01, ge=0)
    z_loss_coef: float = Field(0.0, ge=0)
    out_dir: str = "artifacts/mole"


class EvaluateConfig(Section):
    """Evaluation of every variant on the eval split (stage ``evaluate``)."""

    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    generate_rows: int | None = Field(60, ge=1, description="eval rows used for exact match; null = all")
    generate_batch_size: int = Field(64, ge=1, description="prompts decoded together (left-padded) for exact match")
    latency_reps: int = Field(5, ge=1)
    out_dir: str = "reports"


class MergeConfig(Section):
    """Data-driven pruning and merging of experts (stage ``merge-prune``)."""

    utilization_floor: float = Field(0.02, ge=0.0, lt=1.0, description="prune experts routed less than this")
    retire_after: int = Field(
        1,
        ge=1,
        description="prune (retire) an expert only once it stayed under the floor this many builds in a row (this "
        "one and the incremental builds it descends from; utilization.json in the model dir keeps the history)",
    )
    similarity_ceiling: float = Field(0.9, ge=-1.0, le=1.0, description="merge expert pairs at least this similar")
    refit_steps: int = Field(10, ge=0, description="router re-fit steps after a change")
    refit_lr: float = Field(1e-3, gt=0, description="gate learning rate of the re-fit")
    tolerance: float = Field(0.02, ge=0.0, description="accept if eval loss rises by less than this fraction")
    keep_dir: str = "artifacts/mole.unmerged"


class BuildSection(Section):
    """Incremental builds from a previous model (the champion): reuse, update, add experts (mole.stages.incremental)."""

    incremental: Literal["auto", "never", "always"] = Field(
        "never",
        description="never: a full build; auto: start from build.previous when its clusters still fit the data, "
        "else a full build saying why; always: as auto, but a build that cannot be incremental fails",
    )
    previous: str | None = Field(
        None, description="the previous build: a workspace or MoLE model dir, or models:/<name>@<alias> (flow only)"
    )
    max_new_fraction: float = Field(0.5, gt=0.0, le=1.0, description="more new rows than this: a full build")
    max_disagreement: float = Field(
        0.1, ge=0.0, le=1.0, description="old rows the saved clusterer assigns elsewhere than their labels, at most"
    )
    distance_quantile: float = Field(
        0.95, gt=0.0, le=1.0, description="a row farther than this quantile of every cluster's distances is new"
    )


class FlowConfig(Section):
    """How the Prefect build flow runs its tasks (flows/build.py)."""

    runner: Literal["threads", "dask", "ray"] = Field("threads", description="task runner of the expert fan-out")
    address: str | None = Field(None, description="dask scheduler / ray address; null = a local cluster")
    max_workers: int = Field(2, ge=1, description="experts trained at once")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per task; null = cores / max_workers")
    cpus_per_expert: float = Field(
        1.0, gt=0.0, description="CPUs requested per expert task (ray); also its torch threads unless torch_threads"
    )
    gpus_per_expert: float = Field(0.0, ge=0.0, description="GPUs requested per expert task (ray)")
    retries: int = Field(2, ge=0, description="retries of I/O and server tasks")
    retry_delay_s: float = Field(5.0, ge=0.0, description="first retry delay; doubles on each retry")
    run_name: str = Field("mole-{base}-{date}", description="flow-run name; {base} and {date} are filled in")


class TrackingConfig(Section):
    """MLflow tracking, model registry and the promotion gate (flows/registry.py)."""

    enabled: bool = True
    uri: str | None = Field(None, description="null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the workspace")
    experiment: str = Field("mole", min_length=1)
    model_name: str = Field("mole", min_length=1, description="registered model name")
    metric: str = Field("loss", description="eval.json metric of variant `mole` compared for promotion")
    greater_is_better: bool = False
    promotion_margin: float = Field(0.0, ge=0.0, description="relative improvement needed to replace the champion")
    require_beats_baseline: bool = Field(
        True, description="refuse champion to a build whose model does not beat its own multitask_lora baseline"
    )
    bundle_base_max_mb: float = Field(600.0, ge=0.0, description="bundle the base weights in the model when smaller")
    retries: int = Field(3, ge=0, description="attempts to reach the tracking server before failing")


class DvcConfig(Section):
    """DVC versioning of the datasets and adapters each build wrote."""

    enabled: bool = True
    remote: str | None = Field(
        None, description="remote URL (a local dir or s3://…); null = $MOLE_DVC_REMOTE, else .dvc/remote-storage"
    )
    push: bool = True
