"""The train-experts stage: one LoRA expert per cluster (and the shared adapter and the multitask baseline).

It plans the stage's adapters (``Job``), trains each (``mole.training.lora``), all in one packed run
(``mole.training.packed``) or one co-training run (``mole.training.cotrain``), reuses what is finished with the
same inputs, and writes and checks experts.json.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mole.base import load_configured_base
from mole.config import BuildConfig
from mole.io import atomic_dir, read_jsonl, seal_broken, write_json
from mole.nn.lineage import adapter_digest, made_by
from mole.sections import LoraSection
from mole.training.cotrain import cotrain_steps, run_cotrained, run_fingerprint
from mole.training.lifecycle import copy_adapter, incremental_jobs, incremental_plan, read_plan, write_lifecycle
from mole.training.lora import (
    BASELINE_ID,
    METRICS,
    SHARED_APPLIED,
    SHARED_ID,
    Job,
    expert_id,
    reuse,
    train_lora,
)
from mole.training.packed import run_packed
from mole.workspace import cluster_paths, experts_paths, mole_paths, prepared_paths

logger = logging.getLogger(__name__)


def load_cluster_rows(cfg: BuildConfig) -> dict[int, list[dict[str, Any]]]:
    """The prepared training rows grouped by cluster, from train.jsonl and assignments.jsonl.

    Raises:
        FileNotFoundError: an input is missing (naming the file and the stage to run).
        ValueError: the assignments do not match the prepared rows (clusters are stale).
    """
    train_path, assign_path = prepared_paths(cfg)["train"], cluster_paths(cfg)["assignments"]
    for path, stage in ((train_path, "prepare"), (assign_path, "cluster")):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run `mole {stage}` first")
    rows = {r["id"]: r for r in read_jsonl(train_path)}
    assignments = read_jsonl(assign_path)
    unknown = [a["id"] for a in assignments if a["id"] not in rows]
    if unknown or len(assignments) != len(rows):
        raise ValueError(
            f"{assign_path}: {len(assignments)} assignments for {len(rows)} rows of {train_path} "
            f"({len(unknown)} unknown ids, e.g. {unknown[:3]}); re-run `mole cluster`"
        )
    groups: dict[int, list[dict[str, Any]]] = {}
    for a in assignments:
        groups.setdefault(int(a["cluster"]), []).append(rows[a["id"]])
    return dict(sorted(groups.items()))


def _kept(cfg: BuildConfig, groups: dict[int, Any]) -> set[str]:
    return {expert_id(c) for c in groups} | ({SHARED_ID} if cfg.experts.shared != "none" else set())


def _remove_stale_experts(experts_dir: Path, keep: set[str]) -> None:
    """Delete expert dirs (and checkpoints) of clusters that no longer exist, e.g. after k went down."""
    if not experts_dir.is_dir():
        return
    for path in [*experts_dir.glob("expert_*"), *experts_dir.glob(f"{SHARED_ID}*")]:
        if path.is_dir() and path.name.removesuffix(".ckpt") not in keep:
            logger.warning("removing stale %s (no such cluster now)", path)
            shutil.rmtree(path, ignore_errors=True)


def shared_steps(cfg: BuildConfig) -> int:
    """Steps of the shared LoRA: ``experts.shared_steps``; 0 without one (``experts.shared = none``)."""
    return 0 if cfg.experts.shared == "none" else cfg.experts.shared_steps


def _jobs(cfg: BuildConfig, groups: dict[int, list[dict[str, Any]]]) -> list[Job]:
    """The adapters of the stage, in training order: the shared one (if any), the experts, the baseline."""
    e = cfg.experts
    every_row = [r for rows in groups.values() for r in rows]
    jobs, build_on = [], {}
    steps = e.steps
    if (
        e.shared == "cotrained" and incremental_plan(cfg) is None
    ):  # one run trains them all: each depends on every cluster's rows and the run's steps
        run = run_fingerprint(cfg, {c: [r["id"] for r in rows] for c, rows in groups.items()})
        steps = cotrain_steps(cfg, len(groups))
        jobs.append(Job(SHARED_ID, None, every_row, f"{e.out_dir}/{SHARED_ID}", cfg.seed, steps, "shared",
                         upstream=run))  # fmt: skip
        build_on = {"upstream": run}
    elif e.shared != "none":  # (an incremental build fine-tunes a cotrained shared adapter on its own, as residual)
        shared = Job(SHARED_ID, None, every_row, f"{e.out_dir}/{SHARED_ID}", cfg.seed, shared_steps(cfg), "shared")
        jobs.append(shared)
        key = "init_from" if e.shared == "seed" else "under"  # cotrained (incremental): under, as residual
        build_on = {key: shared.rel_dir, "upstream": shared.fingerprint(cfg)}
    jobs += [
        Job(expert_id(c), c, rows, f"{e.out_dir}/{expert_id(c)}", cfg.seed + c, steps, **build_on)
        for c, rows in groups.items()
    ]
    if e.multitask_baseline:
        lora = multitask_lora(cfg, len(groups))
        steps = multitask_steps(cfg, len(groups))
        jobs.append(Job(BASELINE_ID, None, every_row, e.baseline_dir, cfg.seed, steps, BASELINE_ID, lora))
    plan = incremental_plan(cfg)
    return jobs if plan is None else incremental_jobs(cfg, jobs, plan)


def _joint_trains_experts(cfg: BuildConfig) -> bool:
    r = cfg.router
    return r.routing == "token_topk" and r.steps > 0 and not r.freeze_experts and r.expert_lr > 0


def mole_training(cfg: BuildConfig, k: int) -> dict[str, int]:
    """Optimizer steps and rows of every phase that trains MoLE's adapters (rows = steps × batch size)."""
    e, r = cfg.experts, cfg.router
    if e.shared == "cotrained":  # one run: its shared-only steps, then all adapters together
        out = {"cotrained_steps": e.shared_steps + k * e.steps, "shared_steps": 0, "expert_steps": 0}
    else:
        out = {"cotrained_steps": 0, "shared_steps": shared_steps(cfg), "expert_steps": k * e.steps}
    out["joint_steps"] = r.steps if _joint_trains_experts(cfg) else 0
    adapter_steps = out["cotrained_steps"] + out["shared_steps"] + out["expert_steps"]
    out["rows"] = adapter_steps * e.batch_size + out["joint_steps"] * r.batch_size
    return out


def multitask_steps(cfg: BuildConfig, k: int) -> int:
    """Steps of the multitask baseline: ``experts.multitask_steps``, else the training MoLE gets.

    That is the rows the whole MoLE build trains its adapters on (the shared LoRA, all k experts, and the joint
    phase when it trains the experts too), in steps of the baseline's batch size, so the baseline sees as many
    training tokens as the mixture (docs/architecture.md, "Evaluation").
    """
    if cfg.experts.multitask_steps is not None:
        return cfg.experts.multitask_steps
    return max(1, math.ceil(mole_training(cfg, k)["rows"] / cfg.experts.batch_size))


def rank_per_token(cfg: BuildConfig, k: int) -> int:
    """The adapter rank MoLE applies to a token: its top-k experts' plus the always-on shared expert's."""
    e = cfg.experts
    return e.lora.r * (min(cfg.router.top_k, k) + (1 if e.shared in SHARED_APPLIED else 0))


def multitask_lora(cfg: BuildConfig, k: int) -> LoraSection:
    """The baseline's LoRA: rank ``experts.multitask_r``, else MoLE's rank per token, at the experts' scale alpha/r.

    Keeping alpha / r fixed keeps the size of each rank direction's update, so the wider adapter is not slowed down.
    """
    lora = cfg.experts.lora
    r = cfg.experts.multitask_r or rank_per_token(cfg, k)
    return lora.model_copy(update={"r": r, "lora_alpha": lora.lora_alpha * r / lora.r})


def _run_job(
    cfg: BuildConfig, job: Job, get_base: Callable[[], tuple], progress: Callable[[str, int, int, float], None] | None
) -> dict[str, Any]:
    """Train one job's adapter, or reuse it when finished with the same inputs; returns its experts.json entry."""
    out_dir = cfg.path(job.rel_dir)
    fingerprint = job.fingerprint(cfg)
    metrics = reuse(out_dir, fingerprint, job.name, job.steps, progress)
    if metrics is None and job.copy_from is not None:  # incremental: the previous build's adapter, unchanged
        logger.info("%s: reusing the previous build's adapter %s unchanged", job.name, job.copy_from)
        return job.entry(fingerprint, copy_adapter(cfg, job, out_dir, fingerprint), reused=False)
    if metrics is None:
        for dep in (job.init_from, job.under):
            if dep is not None and dep != job.parent_dir and not (cfg.path(dep) / METRICS).is_file():
                raise FileNotFoundError(f"{job.name}: the shared adapter {cfg.path(dep)} is not trained yet")
        logger.info("%s: training on %d rows for %d steps", job.name, len(job.rows), job.steps)
        step_cb = None if progress is None else lambda s, t, loss: progress(job.name, s, t, loss)
        e = cfg.experts if job.lr_scale == 1.0 else cfg.experts.model_copy(update={"lr": cfg.experts.lr * job.lr_scale})
        dirs = {k: cfg.path(v) if v else None for k, v in (("init_from", job.init_from), ("under", job.under))}
        trained = train_lora(*get_base(), job.rows, lora=job.lora or e.lora, cfg=e, steps=job.steps, out_dir=out_dir,
                             seed=job.seed, fingerprint=fingerprint, progress=step_cb, **dirs)  # fmt: skip
        return job.entry(fingerprint, trained, reused=False)
    return job.entry(fingerprint, metrics, reused=True)


def job_names(cfg: BuildConfig) -> list[str]:
    """The adapters ``train-experts`` trains, in order: one expert per cluster, then the multitask baseline."""
    return [job.name for job in _jobs(cfg, load_cluster_rows(cfg))]


def train_job(
    cfg: BuildConfig,
    name: str,
    *,
    progress: Callable[[str, int, int, float], None] | None = None,
    get_base: Callable[[], tuple] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) one adapter of ``job_names(cfg)`` on its own; returns its experts.json entry.

    This is the unit of the Prefect flow's expert fan-out: each call loads its own base model (unless
    ``get_base`` is given), so calls may run in parallel threads or processes.

    Raises:
        ValueError: ``name`` is not one of ``job_names(cfg)``.
    """
    jobs = {job.name: job for job in _jobs(cfg, load_cluster_rows(cfg))}
    if name not in jobs:
        raise ValueError(f"no adapter named {name!r} in this build; expected one of {sorted(jobs)}")
    return _run_job(cfg, jobs[name], get_base or functools.cache(lambda: load_configured_base(cfg)), progress)


def _mark_baseline_not_trained(path: Path) -> None:
    """Leave ``path`` holding only NOT_TRAINED.json (experts.multitask_baseline is false).

    The directory stays an out of the train-experts stage, so ``dvc commit`` finds it, and an adapter left there
    by an earlier build is removed, so evaluate does not report a stale baseline as this build's.
    """
    marker = {"reason": "experts.multitask_baseline is false: the multitask LoRA baseline was not trained"}
    if (path / "NOT_TRAINED.json").is_file() and len(list(path.iterdir())) == 1:
        return
    with atomic_dir(path) as tmp:
        write_json(tmp / "NOT_TRAINED.json", marker)
    logger.info("multitask baseline not trained: %s holds only NOT_TRAINED.json", path)


def write_index(cfg: BuildConfig, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Write artifacts/experts/experts.json from the entries of every job; return the stage summary."""
    groups = load_cluster_rows(cfg)
    experts_dir = cfg.path(cfg.experts.out_dir)
    _remove_stale_experts(experts_dir, keep=_kept(cfg, groups))
    experts = sorted((x for x in entries if x["cluster"] is not None), key=lambda x: x["cluster"])
    baseline = next((x for x in entries if x["id"] == BASELINE_ID), None)
    shared = next((x for x in entries if x["id"] == SHARED_ID), None)
    if baseline is None:
        _mark_baseline_not_trained(cfg.path(cfg.experts.baseline_dir))
    index = {"k": len(groups), "base_model": cfg.base_model.name, "lora": cfg.experts.lora.model_dump(mode="json")}
    index |= {"shared_mode": cfg.experts.shared, "shared": shared, "training": mole_training(cfg, len(groups))}
    index["sink_tokens"] = cfg.experts.sink_tokens if cfg.experts.shared == "cotrained" else 0
    write_json(experts_dir / "experts.json", {**index, "experts": experts, "baseline": baseline})
    write_lifecycle(cfg, read_plan(cfg), [*([shared] if shared else []), *experts, *([baseline] if baseline else [])])
    return {
        "k": len(groups),
        "trained": [x["id"] for x in entries if not x["reused"]],
        "reused": [x["id"] for x in entries if x["reused"]],
        "paths": {
            "experts": str(experts_dir),
            "experts_json": str(experts_dir / "experts.json"),
            "baseline": str(cfg.path(cfg.experts.baseline_dir)) if baseline else None,
        },
    }


def built_adapters(index: dict[str, Any]) -> dict[str, str]:
    """Adapter id -> fingerprint of what a MoLE model is built from (its experts and shared adapter)."""
    return {e["id"]: e.get("fingerprint") for e in [*index.get("experts", []), index.get("shared")] if e}


def expert_lineage(cfg: BuildConfig, index: dict[str, Any], *, stage: str = "train-router") -> dict[str, dict]:
    """Adapter id -> lineage record (mole.nn.lineage) of each expert (and the shared adapter) of a MoLE model built
    now from the adapters of experts.json ``index``: its parent is that trained adapter (content hash, fingerprint)."""
    build, joint = made_by(cfg, stage), mole_training(cfg, index["k"])["joint_steps"]
    records = {}
    for e in [*index.get("experts", []), index.get("shared")]:
        if e is None:
            continue
        parent = {"id": e["id"], "path": e["path"], "sha256": adapter_digest(cfg.path(e["path"])),
                  "fingerprint": e.get("fingerprint")}  # fmt: skip
        records[e["id"]] = {"id": e["id"], "kind": e.get("kind", "expert"), "cluster": e.get("cluster"),
                            "rows": e.get("rows"), "steps": e.get("steps"), "joint_steps": joint, "made_by": build,
                            "parents": [parent]}  # fmt: skip
    return records


def current_index(cfg: BuildConfig, *, baseline: bool = False) -> dict[str, Any]:
    """artifacts/experts/experts.json, checked against the current clusters and config.

    Every expert (and the shared adapter; the multitask baseline too with ``baseline``) must be the one
    ``train-experts`` would train now, from the current assignments and settings, and must be intact on disk.

    Raises:
        FileNotFoundError: experts.json is missing (run ``mole train-experts``).
        ValueError: an adapter was trained for other clusters, rows or settings, or is missing or corrupt,
            naming it and the stage to re-run.
    """
    path = experts_paths(cfg)["index"]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `mole train-experts` first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); re-run `mole train-experts`") from None
    jobs = [j for j in _jobs(cfg, load_cluster_rows(cfg)) if baseline or j.kind != BASELINE_ID]
    want = {j.name: j.fingerprint(cfg) for j in jobs}
    entries = [*index.get("experts", []), index.get("shared"), index.get("baseline") if baseline else None]
    have = {e["id"]: e for e in entries if e}
    stale = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n, {}).get("fingerprint"))
    if stale:
        why = {n: "not trained" if n not in have else "no such adapter now" if n not in want else "other inputs"
               for n in stale}  # fmt: skip
        what = ", ".join(f"{n} ({why[n]})" for n in stale[:4])
        raise ValueError(
            f"{path}: the adapters were trained for other clusters, rows or settings than the current ones: {what}; "
            "re-run `mole train-experts`"
        )
    for name, entry in have.items():
        out_dir = cfg.path(entry["path"])
        try:
            sealed = json.loads((out_dir / METRICS).read_text(encoding="utf-8")).get("sha256") or {}
        except (OSError, ValueError):
            sealed = None
        problem = f"{out_dir / METRICS} is missing or unreadable" if sealed is None else seal_broken(out_dir, sealed)
        if problem:
            raise ValueError(f"{name}: {problem}; re-run `mole train-experts` to train it again")
    return index


def run_train_experts(cfg: BuildConfig, *, progress: Callable[[str, int, int, float], None] | None = None) -> dict:
    """Train (or reuse) one LoRA expert per cluster and the multitask baseline; write experts.json.

    The base model is loaded once, and only if some adapter needs training. With ``experts.mode == "packed"`` the
    experts are trained together by :func:`mole.training.packed.run_packed`.

    Args:
        cfg: the build configuration (``workspace``, ``base_model``, ``experts``, ``seed``).
        progress: called as ``progress(name, step, total, loss)`` after every step; once with
            ``step == total`` for a reused adapter.

    Returns:
        A JSON-able summary: k, trained and reused ids, seconds, paths.

    Raises:
        FileNotFoundError: train.jsonl or assignments.jsonl is missing.
        ValueError: the cluster assignments do not match the prepared rows.
    """
    t0 = time.perf_counter()
    groups = load_cluster_rows(cfg)
    _remove_stale_experts(cfg.path(cfg.experts.out_dir), keep=_kept(cfg, groups))
    get_base = functools.cache(lambda: load_configured_base(cfg))
    jobs, entries = _jobs(cfg, groups), []
    if incremental_plan(cfg) is not None:  # each adapter on its own: most are copied or briefly fine-tuned
        pass
    elif cfg.experts.shared == "cotrained":  # the shared adapter and the experts in one run, then the baseline
        entries = run_cotrained(cfg, [job for job in jobs if job.kind != BASELINE_ID], get_base, progress)
        jobs = [job for job in jobs if job.kind == BASELINE_ID]
    elif cfg.experts.mode == "packed":  # the shared adapter first, then all experts in one run, then the baseline
        entries = [_run_job(cfg, job, get_base, progress) for job in jobs if job.kind == "shared"]
        entries += run_packed(cfg, [job for job in jobs if job.cluster is not None], get_base, progress)
        jobs = [job for job in jobs if job.kind == BASELINE_ID]
    entries += [_run_job(cfg, job, get_base, progress) for job in jobs]
    return {**write_index(cfg, entries), "seconds": round(time.perf_counter() - t0, 3)}


def check_model_current(cfg: BuildConfig) -> None:
    """artifacts/mole must be built from the adapters experts.json holds now (themselves current and intact).

    Raises:
        FileNotFoundError: no MoLE model (run ``mole train-router``).
        ValueError: the experts are stale (re-run ``mole train-experts``), or the model was built from other
            experts than those (re-run ``mole train-router``).
    """
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
