"""One function per pipeline stage: config in, workspace files out, a small JSON-able summary returned.

Stages read and write only the workspace paths of docs/architecture.md, each output written atomically, so the CLI,
DVC (``dvc repro``) and the Prefect flow can all call them and a failed stage leaves earlier outputs intact.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mole.config import BuildConfig
from mole.io import atomic_dir, read_jsonl, recover, write_json, write_jsonl

logger = logging.getLogger(__name__)


def output_dirs(cfg: BuildConfig) -> list[Path]:
    """Every stage's output directory (and where their atomic temps live: the directories and their parents)."""
    dirs = [cfg.data.out_dir, cfg.cluster.out_dir, cfg.experts.out_dir, cfg.experts.baseline_dir, cfg.router.out_dir,
            cfg.evaluate.out_dir, cfg.merge.keep_dir]  # fmt: skip
    return [cfg.path(d) for d in dirs]


def recover_workspace(cfg: BuildConfig) -> None:
    """Before a stage: put back outputs a killed write left missing and remove unfinished temps (``mole.io.recover``).

    It also puts back the MoLE model if merge-prune was killed between its two renames (the unmerged one: the
    stage then runs again).
    """
    mole_dir, keep = cfg.path(cfg.router.out_dir), cfg.path(cfg.merge.keep_dir)
    if not mole_dir.exists() and (keep / "mole_config.json").exists():
        keep.rename(mole_dir)
        logger.warning("restored %s from %s (merge-prune was interrupted)", mole_dir, keep)
    roots = {p for d in output_dirs(cfg) for p in (d, d.parent)} | {cfg.path(STAGE_TIMES).parent}
    for line in recover(roots):
        logger.warning("%s", line)


def check_writable(cfg: BuildConfig) -> None:
    """Fail before any work when the workspace or an output dir (or, not made yet, its nearest parent) is not writable.

    Raises:
        PermissionError: naming the directory and the OS's reason.
    """
    import tempfile

    probed: set[Path] = set()
    for target in [cfg.path("."), *output_dirs(cfg)]:
        d = target
        while not d.exists() and d.parent != d:  # a dir made later: its nearest existing ancestor must take it
            d = d.parent
        if d in probed:
            continue
        probed.add(d)
        try:
            fd, probe = tempfile.mkstemp(prefix=".mole-tmp-probe.", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            where = "" if d == target else f" in {d}"
            raise PermissionError(
                f"{target}: cannot write there ({exc.strerror or exc}{where}); make it writable or choose another "
                "workspace (--set workspace=DIR)"
            ) from None
    cfg.path(".").mkdir(parents=True, exist_ok=True)


STAGE_TIMES = ".mole/stage_times.json"  # workspace-relative: each stage's wall time in its latest run


def stage_times(cfg: BuildConfig) -> dict[str, float]:
    """Stage name -> wall seconds of its latest run in this workspace (``{}`` before any)."""
    path = cfg.path(STAGE_TIMES)
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_stage_time(cfg: BuildConfig, stage: str, seconds: float) -> None:
    """Remember ``stage``'s wall time (kept out of the stages' outputs, so their content hashes stay stable)."""
    write_json(cfg.path(STAGE_TIMES), {**stage_times(cfg), stage: round(seconds, 3)})


def _timed(stage: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Record the wall time of each successful run of the decorated stage function (see ``stage_times``)."""

    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @functools.wraps(fn)
        def run(cfg: BuildConfig, *args: Any, **kwargs: Any) -> dict[str, Any]:
            t0 = time.perf_counter()
            out = fn(cfg, *args, **kwargs)
            record_stage_time(cfg, stage, time.perf_counter() - t0)
            return out

        return run

    return wrap


def begin(cfg: BuildConfig) -> None:
    """What every stage does first: check the workspace is writable, then repair interrupted writes."""
    check_writable(cfg)
    recover_workspace(cfg)


def prepared_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``prepare`` writes its outputs."""
    out = cfg.path(cfg.data.out_dir)
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "stats": out / "stats.json"}


def cluster_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``cluster`` writes its outputs."""
    out = cfg.path(cfg.cluster.out_dir)
    return {
        "dir": out,
        "assignments": out / "assignments.jsonl",
        "eval_assignments": out / "eval_assignments.jsonl",
        "centroids": out / "centroids.npy",
        "report": out / "report.json",
    }


@_timed("prepare")
def prepare(cfg: BuildConfig) -> dict[str, Any]:
    """Validate, clean and split the data into data/prepared/{train,eval}.jsonl and stats.json."""
    begin(cfg)
    from mole.data.prepare import prepare_dataset

    train, evals, stats = prepare_dataset(cfg)
    paths = prepared_paths(cfg)
    # The three files are written into a fresh directory that replaces the old one only when all succeed.
    with atomic_dir(paths["train"].parent) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", evals)
        write_json(tmp / "stats.json", stats)
    return {**stats, "paths": {k: str(v) for k, v in paths.items()}}


def load_prepared(cfg: BuildConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prepared (train, eval) rows; a clear error when `mole prepare` has not run."""
    paths = prepared_paths(cfg)
    for key in ("train", "eval"):
        if not paths[key].exists():
            raise FileNotFoundError(f"{paths[key]} does not exist; run `mole prepare` first")
    return read_jsonl(paths["train"]), read_jsonl(paths["eval"])


@_timed("cluster")
def cluster(cfg: BuildConfig) -> dict[str, Any]:
    """Embed and cluster the training rows; write assignments, centroids, the clusterer and report.json."""
    begin(cfg)
    from mole.cluster import fit_clusters, row_text
    from mole.embed import make_embedder

    train, evals = load_prepared(cfg)
    c = cfg.cluster
    if len(train) < c.min_rows():
        raise ValueError(
            f"{prepared_paths(cfg)['train']}: {len(train)} rows is too few for the requested clusters "
            f"(needs at least {c.min_rows()}); lower cluster.min_cluster_size or add data"
        )
    bm = cfg.base_model
    embedder = make_embedder(
        c.embedder,
        dim=c.tfidf_dim,
        seed=cfg.seed,
        batch_size=c.batch_size,
        base_spec=bm.name,
        revision=bm.revision,
        trust_remote_code=bm.trust_remote_code,
        dtype=bm.dtype,
        device=bm.device,
    )
    clusterer, labels, report = fit_clusters(
        train,
        embedder,
        k=c.k,
        k_min=c.k_min,
        k_max=c.k_max,
        min_cluster_size=c.min_cluster_size,
        balanced=c.balanced,
        n_init=c.n_init,
        seed=cfg.seed,
        sample=c.silhouette_sample,
        k_rule=c.k_rule,
        k_tolerance=c.k_tolerance,
        k_gain_fraction=c.k_gain_fraction,
        refine_rows=c.refine,
        lm_smoothing=c.lm_smoothing,
    )
    eval_labels = clusterer.assign([row_text(r) for r in evals])
    report["eval_sizes"] = [int((eval_labels == i).sum()) for i in range(clusterer.k)]
    paths = cluster_paths(cfg)
    with atomic_dir(paths["dir"]) as tmp:
        clusterer.save(tmp)
        write_jsonl(tmp / "assignments.jsonl", _assignments(train, labels))
        write_jsonl(tmp / "eval_assignments.jsonl", _assignments(evals, eval_labels))
        write_json(tmp / "report.json", report)
    logger.info("k=%d sizes=%s silhouette=%s ari=%s", report["k"], report["sizes"], report["silhouette"], report["ari"])
    return {**report, "paths": {k: str(v) for k, v in paths.items()}}


def _assignments(rows: list[dict[str, Any]], labels: Any) -> list[dict[str, Any]]:
    out = []
    for row, label in zip(rows, labels, strict=True):
        item = {"id": row["id"], "cluster": int(label)}
        if "domain" in row:
            item["domain"] = row["domain"]
        out.append(item)
    return out


def experts_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``train-experts`` writes its outputs."""
    out = cfg.path(cfg.experts.out_dir)
    return {"dir": out, "index": out / "experts.json", "baseline": cfg.path(cfg.experts.baseline_dir)}


def mole_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``train-router`` writes the MoLE model."""
    out = cfg.path(cfg.router.out_dir)
    return {"dir": out, "config": out / "mole_config.json", "metrics": out / "train_metrics.json"}


@_timed("train-experts")
def train_experts(cfg: BuildConfig, progress: Any = None) -> dict[str, Any]:
    """Train one LoRA expert per cluster (and the multitask baseline) into artifacts/experts/."""
    begin(cfg)
    from mole.experts import run_train_experts

    return run_train_experts(cfg, progress=progress)


def base_ref(cfg: BuildConfig) -> dict[str, Any]:
    """The base-model reference stored with a MoLE model (enough to load it again)."""
    return {**cfg.base_model.model_dump(mode="json"), "seed": cfg.seed}


@_timed("train-router")
def train_router(cfg: BuildConfig, progress: Any = None) -> dict[str, Any]:
    """Build the MoLE model from the experts, warm-start and jointly train the routers, save artifacts/mole/."""
    begin(cfg)
    from mole.base import load_base
    from mole.experts import SHARED_APPLIED, built_adapters, current_index
    from mole.model import MoLEModel
    from mole.train import joint_train, routing_agreement, row_routing, warm_start_gates

    train, evals = load_prepared(cfg)
    full_index = current_index(cfg)  # the experts of the current clusters and settings, intact
    index = full_index["experts"]
    shared = full_index.get("shared")
    cpaths = cluster_paths(cfg)
    clusters = {a["id"]: a["cluster"] for a in read_jsonl(cpaths["assignments"])}
    eval_clusters = {a["id"]: a["cluster"] for a in read_jsonl(cpaths["eval_assignments"])}
    expert_of = {e["cluster"]: i for i, e in enumerate(index)}
    bm = cfg.base_model
    base, tok = load_base(
        bm.name,
        revision=bm.revision,
        trust_remote_code=bm.trust_remote_code,
        dtype=bm.dtype,
        device=bm.device,
        seed=cfg.seed,
    )
    model = MoLEModel.from_experts(
        base=base,
        tokenizer=tok,
        expert_dirs=[cfg.path(e["path"]) for e in index],
        expert_ids=[e["id"] for e in index],
        base_ref=base_ref(cfg),
        top_k=cfg.router.top_k,
        routing=cfg.router.routing,
        path=cfg.router.path,
        clusters=[e["cluster"] for e in index],
        shared_dir=cfg.path(shared["path"]) if shared and full_index.get("shared_mode") in SHARED_APPLIED else None,
        pool=cfg.router.pool,
    )
    r, max_len = cfg.router, cfg.experts.max_length
    stats = prepared_paths(cfg)["stats"]
    if stats.exists():
        model.spec.prompt_suffix = json.loads(stats.read_text(encoding="utf-8")).get("prompt_suffix")
    if r.top_k > model.spec.top_k:  # k was chosen below router.top_k: every expert is a token's top-k
        logger.warning("router.top_k=%d but only %d experts (k chosen by the clusters): routing uses top_k=%d",
                       r.top_k, model.spec.num_experts, model.spec.top_k)  # fmt: skip
    train_experts_idx = [expert_of[clusters[row["id"]]] for row in train]
    eval_experts_idx = [expert_of[eval_clusters[row["id"]]] for row in evals]
    metrics: dict[str, Any] = {"built_from": built_adapters(full_index), "warm_start": None,
                               "top_k": {"configured": r.top_k, "used": model.spec.top_k}}  # fmt: skip
    if model.spec.num_experts == 1:  # k = 1: no mixture, every token goes to the one expert whatever the gate says
        logger.info("one expert (k = 1): no routing to warm-start or learn")
    elif r.warm_start:
        metrics["warm_start"] = warm_start_gates(
            model, train[: r.warm_start_rows], train_experts_idx[: r.warm_start_rows], method=r.warm_start_method,
            c=r.warm_start_c, batch_size=r.batch_size, max_length=max_len, max_tokens=r.warm_start_tokens,
            seed=cfg.seed,
        )  # fmt: skip
    metrics["agreement_before_training"] = routing_agreement(
        row_routing(model, evals, batch_size=r.batch_size, max_length=max_len)[1], eval_experts_idx
    )
    if r.routing == "token_topk" and r.steps > 0:
        metrics["joint"] = joint_train(model, train, r, max_length=max_len, seed=cfg.seed, progress=progress)
    weights, logits = row_routing(model, evals, batch_size=r.batch_size, max_length=max_len)
    metrics["agreement"] = routing_agreement(logits, eval_experts_idx)
    metrics["utilization"] = weights.mean(0).round(4).tolist()  # (L, E): mean routing weight per block
    paths = mole_paths(cfg)
    model.save_pretrained(
        paths["dir"], extra_files={"clusterer": cpaths["dir"]}, extra_json={"train_metrics.json": metrics}
    )
    logger.info(
        "router agreement with clusters: %.3f before joint training, %.3f after",
        metrics["agreement_before_training"],
        metrics["agreement"],
    )
    summary = {k: v for k, v in metrics.items() if k not in ("joint", "built_from")}
    if "joint" in metrics:
        j = metrics["joint"]
        summary.update(final_loss=j["loss"][-1], seconds=j["seconds"], tokens_per_s=j["tokens_per_s"])
    return {**summary, "experts": len(index), "paths": {k: str(v) for k, v in paths.items()}}


def check_model_current(cfg: BuildConfig) -> None:
    """artifacts/mole must be built from the adapters experts.json holds now (themselves current and intact).

    Raises:
        FileNotFoundError: no MoLE model (run ``mole train-router``).
        ValueError: the experts are stale (re-run ``mole train-experts``), or the model was built from other
            experts than those (re-run ``mole train-router``).
    """
    import json

    from mole.experts import built_adapters, current_index

    paths = mole_paths(cfg)
    if not paths["config"].exists():
        raise FileNotFoundError(f"{paths['dir']} holds no MoLE model; run `mole train-router` first")
    now = built_adapters(current_index(cfg, baseline=cfg.experts.multitask_baseline))
    try:
        built = json.loads(paths["metrics"].read_text(encoding="utf-8")).get("built_from")
    except (OSError, ValueError):
        built = None
    if built != now:
        raise ValueError(
            f"{paths['dir']}: built from other experts than {experts_paths(cfg)['index']} holds now (or by an older "
            "mole that did not record them); re-run `mole train-router`"
        )


@_timed("evaluate")
def evaluate(cfg: BuildConfig) -> dict[str, Any]:
    """Evaluate every variant on the eval split: reports/eval.json, eval.md and the PNGs."""
    begin(cfg)
    from mole.evaluate import run_evaluate

    report = run_evaluate(cfg)
    out = cfg.path(cfg.evaluate.out_dir)
    return {**report, "paths": {"eval": str(out / "eval.json"), "markdown": str(out / "eval.md")}}


@_timed("merge-prune")
def merge_prune(cfg: BuildConfig) -> dict[str, Any]:
    """Prune unused and merge similar experts; keep the result only if eval loss stays within the tolerance.

    When the change is accepted, the merged model is evaluated and added to reports/eval.json as ``mole_merged``.
    """
    begin(cfg)
    from mole.merge import run_merge_prune

    summary = run_merge_prune(cfg)
    report = cfg.path(cfg.evaluate.out_dir) / "eval.json"
    if summary.get("accepted") and report.exists():
        from mole.evaluate import _eval_inputs, _variant_kwargs, add_variant, evaluate_variant, write_card
        from mole.metrics import ModelScorer, mole_generator
        from mole.model import MoLEModel

        rows, clusters, _, _ = _eval_inputs(cfg)
        bm = cfg.base_model
        model = MoLEModel.from_pretrained(
            mole_paths(cfg)["dir"], device=bm.device, trust_remote_code=bm.trust_remote_code
        )
        gen = mole_generator(model, max_new_tokens=cfg.evaluate.max_new_tokens)
        metrics = evaluate_variant(
            "mole_merged", ModelScorer(model, model.tokenizer), rows, clusters, **_variant_kwargs(cfg), generate=gen
        )
        training = _merged_training(report, model)
        write_card(cfg, add_variant(report, "mole_merged", metrics, training=training))  # the card of the merged model
        summary["mole_merged"] = {k: metrics[k] for k in ("loss", "ppl", "exact_match")}
    return summary


def _merged_training(report: Path, model: Any) -> dict[str, Any] | None:
    """mole_merged's training compute: mole's adapters (the router re-fit trains no adapter), its own rank per token."""
    import json

    mole = json.loads(report.read_text(encoding="utf-8")).get("training", {}).get("mole")
    if mole is None:
        return None
    spec = model.spec
    return {**mole, "rank": spec.r * (spec.top_k + (spec.shared is not None))}
