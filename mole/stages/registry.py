"""The stage registry: what each stage runs, the config it reads, the code it runs and what it reads and writes.

One entry per stage is the whole contract. The CLI sub-commands, the Prefect flow's tasks (their cache keys and
the outputs whose absence re-runs them) and ``dvc.yaml`` (``mole dvc-yaml``) are derived from it, so adding a stage
is one entry here plus its function in :mod:`mole.stages.pipeline`.

Paths of inputs and outputs are written as in ``dvc.yaml``: workspace-relative, ``${section.key}`` standing for a
config value (DVC fills those in from params.yaml).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mole.config import BuildConfig
from mole.workspace import UTILIZATION_FILE, cluster_paths, eval_paths, experts_paths, mole_paths, prepared_paths


@dataclass(frozen=True)
class Output:
    """One output path of a stage; ``kind`` is its DVC kind (outs, metrics or plots)."""

    path: str
    kind: str = "outs"
    persist: bool = False  # DVC must not delete it before the stage runs (a later stage rewrites it in place)
    props: tuple[tuple[str, Any], ...] = ()  # DVC plot properties (x, y, template, ...)


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: ``run(cfg, ...)`` reads ``reads`` of the config and ``inputs``, writes ``outputs``."""

    name: str  # the CLI sub-command, the DVC stage and the Prefect task
    function: str  # its function in mole.stages.pipeline (imported on first use: the CLI starts without torch)
    help: str
    reads: tuple[str, ...]  # config keys (sections or dotted keys): the flow's cache key and DVC's params
    code: tuple[str, ...]  # repo-relative sources it runs (DVC deps)
    inputs: tuple[str, ...] = ()  # upstream outputs it reads (DVC deps)
    outputs: tuple[Output, ...] = ()
    done: Callable[[BuildConfig], list[Path]] = field(default=lambda cfg: [])  # files that mark it finished
    # Params DVC alone needs: a change there must re-run this stage (see train-router's note). Not a cache key.
    dvc_params: tuple[str, ...] = ()
    progress: bool = False  # it takes a ``progress(name, step, total, loss)`` callback (training and evaluation)

    @property
    def run(self) -> Callable[..., dict[str, Any]]:
        """The stage function: ``run(cfg)``, or ``run(cfg, progress)`` for a training stage."""
        return getattr(importlib.import_module("mole.stages.pipeline"), self.function)

    def dvc(self, root: Path) -> dict[str, Any]:
        """This stage's entry of dvc.yaml; a directory of code stands for its .py files (never its caches)."""
        code = [str(f.relative_to(root)) for c in self.code
                for f in (sorted((root / c).rglob("*.py")) if (root / c).is_dir() else [root / c])]  # fmt: skip
        out: dict[str, Any] = {"cmd": f"mole {self.name}", "deps": [*self.inputs, *code],
                               "params": [*self.reads, *self.dvc_params]}  # fmt: skip
        for o in self.outputs:
            props = {**({"persist": True} if o.persist else {}), **dict(o.props)}
            out.setdefault(o.kind, []).append({o.path: props} if props else o.path)
        return out


# Every stage reads these two: the seed and the base model shape every output.
COMMON = ("seed", "base_model")
# The multitask baseline's steps include the joint phase's rows and its rank the one MoLE applies per token
# (mole.training.experts.multitask_steps and multitask_lora), so train-experts reads these router keys.
BASELINE_READS = ("router.steps", "router.batch_size", "router.routing", "router.expert_lr", "router.freeze_experts",
                  "router.top_k")  # fmt: skip

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "prepare", "prepare", "Validate, clean and split the data into data/prepared/.",
            reads=("seed", "data"), code=("mole/data", "mole/io.py", "mole/stages"),
            outputs=(Output("${data.out_dir}"),), done=lambda cfg: list(prepared_paths(cfg).values()),
        ),
        Stage(
            "cluster", "cluster",
            "Embed and cluster the training rows (k chosen automatically unless cluster.k is set).",
            reads=(*COMMON, "cluster", "build", "experts.lora", "experts.shared"),
            code=("mole/cluster", "mole/stages"), inputs=("${data.out_dir}",),
            outputs=(Output("${cluster.out_dir}"),), done=lambda cfg: [cluster_paths(cfg)["report"]],
        ),
        Stage(
            "train-experts", "train_experts",
            "Train the shared adapter, one LoRA expert per cluster and the multitask baseline (peft adapter dirs).",
            reads=(*COMMON, "experts", *BASELINE_READS, "router.first_gate", "router.warm_start_c"),
            code=("mole/training", "mole/nn/packed_bank.py", "mole/nn/first_gate.py", "mole/nn/logistic.py",
                  "mole/nn/adapters.py", "mole/base.py", "mole/stages"),
            inputs=("${data.out_dir}", "${cluster.out_dir}"),
            outputs=(Output("${experts.out_dir}"), Output("${experts.baseline_dir}"),
                     Output("${evaluate.out_dir}/lifecycle.json")),
            done=lambda cfg: [experts_paths(cfg)["index"]], progress=True,
        ),
        # merge-prune rewrites artifacts/mole in place and DVC allows one owner per path: train-router owns what
        # merge-prune carries over unchanged, and lists evaluate's and merge's params so that a change there
        # re-runs the chain from the router (merge-prune never merges an already merged model).
        Stage(
            "train-router", "train_router",
            "Build the MoLE model, warm-start the routers and fine-tune routers and experts jointly.",
            reads=(*COMMON, "experts", "router"), dvc_params=("evaluate", "merge"),
            code=("mole/routing", "mole/nn", "mole/eval", "mole/merge.py", "mole/training/gallery.py", "mole/stages"),
            inputs=("${data.out_dir}", "${cluster.out_dir}", "${experts.out_dir}"),
            outputs=(Output("${router.out_dir}/train_metrics.json"), Output("${router.out_dir}/clusterer")),
            done=lambda cfg: [mole_paths(cfg)["config"]], progress=True,
        ),
        Stage(
            "evaluate", "evaluate", "Evaluate every variant on the eval split: reports/eval.json and eval.md.",
            reads=(*COMMON, "experts", "router", "evaluate"), code=("mole/eval", "mole/stages"),
            inputs=("${data.out_dir}", "${cluster.out_dir}", "${experts.out_dir}", "${experts.baseline_dir}",
                    "${router.out_dir}/train_metrics.json"),
            outputs=(Output("${evaluate.out_dir}/loss_curves.png", "plots"),
                     Output("${evaluate.out_dir}/routing_heatmap.png", "plots"),
                     Output("${evaluate.out_dir}/cluster_map.png", "plots"),
                     Output("${evaluate.out_dir}/token_routing.png", "plots"),
                     Output("${evaluate.out_dir}/eval_rows.jsonl"),
                     Output("${evaluate.out_dir}/curves", "plots", props=(("x", "step"), ("y", "loss")))),
            done=lambda cfg: [eval_paths(cfg)["eval"]], progress=True,
        ),
        Stage(
            "merge-prune", "merge_prune",
            "Prune unused and merge similar experts when eval loss allows; the result is evaluated too.",
            reads=(*COMMON, "experts.max_length", "router", "evaluate", "merge"),
            code=("mole/merge.py", "mole/training/lifecycle.py", "mole/stages"),
            inputs=("${data.out_dir}", "${router.out_dir}/train_metrics.json", "${evaluate.out_dir}/loss_curves.png",
                    "${evaluate.out_dir}/routing_heatmap.png"),
            outputs=(
                *(Output(f"${{router.out_dir}}/{f}", persist=True)
                  for f in ("mole_config.json", "router.safetensors", "experts")),
                Output(f"${{router.out_dir}}/{UTILIZATION_FILE}", persist=True),
                *(Output(f"${{evaluate.out_dir}}/{f}", persist=True) for f in ("eval.md", "model_card.md")),
                Output("${evaluate.out_dir}/eval.json", persist=True),
                Output("${evaluate.out_dir}/metrics.json", "metrics", persist=True),
                Output("${evaluate.out_dir}/variants.csv", "plots", persist=True,
                       props=(("x", "variant"), ("y", "loss"), ("template", "bar_horizontal"))),
                Output("${evaluate.out_dir}/merge_prune.json", "metrics"),
                *(Output(f"${{evaluate.out_dir}}/{f}", "plots", persist=True)
                  for f in ("per_cluster_loss.png", "variants.png")),
            ),
            done=lambda cfg: [eval_paths(cfg)["merge_prune"]],
        ),
    )
}  # fmt: skip

DVC_HEADER = """\
# Generated from the stage registry (mole/stages/registry.py) by `mole dvc-yaml`: edit the registry, not this file.
# The mole build as a DVC pipeline: `dvc repro` runs the stages without Prefect; after a Prefect build,
# flows/versioning.py records the same outs (`dvc commit`) and pushes them. Paths come from params.yaml.
# merge-prune rewrites artifacts/mole and reports/eval.json in place and DVC allows one owner per path, so each
# path is an out of the stage that leaves it in its final state (persist: DVC must not delete it before
# merge-prune reads it). Add a local data.source file to the deps of prepare (or `dvc add` it) to version it too.
"""


ROOT = Path(__file__).resolve().parents[2]  # the source tree: mole/ and dvc.yaml


def dvc_yaml() -> str:
    """The content of dvc.yaml, derived from ``STAGES``."""
    stages = {name: s.dvc(ROOT) for name, s in STAGES.items()}
    return DVC_HEADER + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)
