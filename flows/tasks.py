"""Thin Prefect tasks around ``mole.stages``: config and small dicts in, paths and small dicts out.

Stage tasks are deterministic, so they do not retry; their cache keys (flows/cache.py) let a re-run of a crashed
build skip what already finished. Only the steps that talk to servers or remotes retry, with backoff.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.cache import adapter_key, content_hash, stage_key
from flows.runners import ray_resources
from mole import stages, workspace
from mole.config import BuildConfig


def torch_threads(cfg: BuildConfig, *, parallel: int = 1, cpus: float | None = None) -> int:
    """Set and return torch's thread count for a task that runs beside ``parallel - 1`` others, or that Ray reserved
    ``cpus`` CPUs for."""
    import torch

    n = cfg.flow.torch_threads or max(1, int(cpus) if cpus else (os.cpu_count() or 1) // parallel)
    torch.set_num_threads(n)
    return n


@task(name="prepare", cache_key_fn=stage_key("prepare"), persist_result=True)
def prepare(config: BuildConfig) -> dict[str, Any]:
    """Validate, clean and split the data."""
    res = stages.prepare(config)
    return {**res, "hash": content_hash(workspace.prepared_paths(config).values())}


@task(name="fetch-previous")
def fetch_previous(config: BuildConfig) -> dict[str, Any] | None:
    """The previous build an incremental build starts from (``build.previous``; with ``build.incremental = auto`` and
    none given, the registered champion when there is one): a ``models:/`` version is downloaded and staged in the
    workspace. Returns its ref and content hash (the cluster task's cache key), or None."""
    import tempfile

    from flows.lineage import tracking_uri
    from flows.versions import download_version, has_alias
    from mole.stages.incremental import model_dir_of, stage_previous

    b, t, log = config.build, config.tracking, get_run_logger()
    ref = b.previous
    if (
        ref is None
        and b.incremental == "auto"
        and t.enabled
        and has_alias(t.model_name, "champion", uri=tracking_uri(config))
    ):
        ref = f"models:/{t.model_name}@champion"
    if ref is None:
        return None
    if ref.startswith("models:/"):
        with tempfile.TemporaryDirectory(dir=config.path(".")) as tmp:
            label, local = download_version(ref, uri=tracking_uri(config), dest=Path(tmp))
            staged = stage_previous(config, model_dir_of(local), ref)
        log.info("incremental build from %s (%s), staged in %s", ref, label, staged)
        return {"ref": ref, "hash": content_hash([staged])}
    path = config.path(ref) if not Path(ref).is_absolute() else Path(ref)
    return {"ref": ref, "hash": content_hash([model_dir_of(path)]) if path.exists() else None}


@task(name="cluster", cache_key_fn=stage_key("cluster"), persist_result=True)
def cluster(config: BuildConfig, prepared: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Embed and cluster the training rows (k chosen automatically unless set)."""
    torch_threads(config)
    res = stages.cluster(config)
    return {**res, "hash": content_hash([workspace.cluster_paths(config)["dir"]])}


# Progress for a terminal that runs the flow in its own process (``mole build``): records that carry
# ``progress = (name, step, total, note)``, for a handler the CLI attaches; never propagated to other handlers.
PROGRESS = logging.getLogger("flows.progress")
PROGRESS.propagate = False
PROGRESS.setLevel(logging.INFO)  # whatever the root logger says: only a progress handler sees these


def report_progress(name: str, step: int, total: int, note: str) -> None:
    if PROGRESS.handlers:  # a terminal listens; a logging config may have turned propagation back on, so no flood
        PROGRESS.info("%s %d/%d %s", name, step, total, note, extra={"progress": (name, step, total, note)})


class _ProgressArtifact:
    """Feeds a Prefect progress artifact (and the run log, every 10 %) from the trainers' progress calls."""

    def __init__(self, name: str, config: BuildConfig, live_run: str | None) -> None:
        self.logger = get_run_logger()
        self.curves = None
        if live_run:  # MLflow is imported only by builds that track
            from flows.live import Curves

            self.curves = Curves(config, live_run)
        self.id = create_progress_artifact(0.0, description=f"training {name}")
        self.logged, self.updated = -100.0, 0.0  # percent last logged, time of the last artifact update

    def __call__(self, name: str, step: int, total: int, loss: float) -> None:
        if self.curves is not None:  # first: a terminal that sees the last step sees its curve in MLflow
            self.curves(name, step, total, loss)
        note = f"loss {loss:.4f}" if math.isfinite(loss) else ""  # no loss known yet (the warm start's first fits)
        report_progress(name, step, total, note)
        pct, now = 100.0 * step / max(1, total), time.monotonic()
        if step >= total or now - self.updated >= 2.0:  # the API is not called on every step
            update_progress_artifact(self.id, pct, description=f"{name}: step {step}/{total} {note}".rstrip())
            self.updated = now
        if step >= total or pct - self.logged >= 10.0:
            self.logger.info("%s step %d/%d %s", name, step, total, note)
            self.logged = pct


@task(name="train-expert", task_run_name="train-{name}", cache_key_fn=adapter_key, persist_result=True)
def train_expert(
    config: BuildConfig, name: str, clusters: dict[str, Any], live_run: str | None = None
) -> dict[str, Any]:
    """Train (or reuse) one LoRA adapter: a cluster's expert or the multitask baseline."""
    from mole.training.experts import train_job

    reserved = ray_resources()  # what Ray reserved for this task (flow.cpus_per_expert, gpus_per_expert); None off Ray
    threads = torch_threads(config, parallel=config.flow.max_workers, cpus=(reserved or {}).get("CPU"))
    on_ray = f" (Ray reserved {reserved})" if reserved else ""
    get_run_logger().info("training %s with %d torch threads%s", name, threads, on_ray)
    entry = train_job(config, name, progress=_ProgressArtifact(name, config, live_run))
    # pid: which process trained it (a thread of the flow's, or a Dask/Ray worker).
    return {**entry, "pid": os.getpid(), "resources": reserved, "hash": content_hash([config.path(entry["path"])])}


@task(name="train-experts-packed", cache_key_fn=stage_key("train-experts"), persist_result=True)
def train_experts_packed(config: BuildConfig, clusters: dict[str, Any], live_run: str | None = None) -> dict[str, Any]:
    """Train every expert in one run over one copy of the base (``experts.mode = packed`` or ``shared = cotrained``)."""
    torch_threads(config)
    res = stages.train_experts(config, progress=_ProgressArtifact("experts (packed)", config, live_run))
    return {**res, "hash": content_hash([workspace.experts_paths(config)["dir"]])}


@task(
    name="index-experts",
    cache_key_fn=stage_key("train-experts", reads=("seed", "base_model", "experts")),
    persist_result=True,
)
def index_experts(config: BuildConfig, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Write artifacts/experts/experts.json from the fan-out's results."""
    from mole.training.experts import write_index

    res = write_index(config, [{k: v for k, v in e.items() if k not in ("hash", "pid", "resources")} for e in entries])
    return {**res, "hash": content_hash([workspace.experts_paths(config)["index"]])}


@task(name="train-router", cache_key_fn=stage_key("train-router"), persist_result=True)
def train_router(config: BuildConfig, experts: dict[str, Any], live_run: str | None = None) -> dict[str, Any]:
    """Warm-start the routers and fine-tune routers and experts jointly."""
    torch_threads(config)
    res = stages.train_router(config, progress=_ProgressArtifact("router", config, live_run))
    return {**res, "hash": content_hash([workspace.mole_paths(config)["dir"]])}


@task(name="evaluate", cache_key_fn=stage_key("evaluate"), persist_result=True)
def evaluate(config: BuildConfig, model: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every variant on the eval split."""
    torch_threads(config)
    res = stages.evaluate(config, progress=_ProgressArtifact("evaluation", config, None))
    return {**res, "hash": content_hash([res["paths"]["eval"]])}


@task(name="merge-prune", cache_key_fn=stage_key("merge-prune"), persist_result=True)
def merge_prune(config: BuildConfig, report: dict[str, Any]) -> dict[str, Any]:
    """Prune unused and merge similar experts when eval loss allows."""
    torch_threads(config)
    res = stages.merge_prune(config)
    get_run_logger().info("merge/prune: %s", "accepted" if res.get("accepted") else "kept the original")
    return {**res, "hash": content_hash([workspace.mole_paths(config)["dir"], workspace.eval_paths(config)["eval"]])}


def _backoff(config: BuildConfig) -> dict[str, Any]:
    """Retry options for tasks that talk to servers or remotes: ``flow.retries`` with doubling delays."""
    f = config.flow
    return {"retries": f.retries, "retry_delay_seconds": [f.retry_delay_s * 2**i for i in range(f.retries)]}


@task(name="check-tracking")
def check_tracking(config: BuildConfig, merged: dict[str, Any]) -> str:
    """Fail before anything is committed or pushed when the tracking server cannot be reached; returns its URI."""
    from flows.lineage import tracking_uri
    from flows.tracking import wait_for_server

    uri = tracking_uri(config)
    wait_for_server(uri, attempts=max(1, config.tracking.retries))
    return uri


@task(name="record-outputs")
def record_outputs(config: BuildConfig, merged: dict[str, Any]) -> dict[str, Any]:
    """Record the build's datasets and adapters with DVC (dvc commit) and push them to the remote."""
    from flows.versioning import record_outputs as record

    res = record(config)
    get_run_logger().info("DVC: %d outputs recorded, pushed=%s", len(res.get("hashes", {})), res.get("pushed"))
    return res


@task(name="register")
def register(
    config: BuildConfig, merged: dict[str, Any], versions: dict[str, Any] | None, live_run: str | None = None
) -> dict[str, Any]:
    """Log the build to MLflow, register the model as challenger and promote it when it beats the champion."""
    from prefect.runtime import flow_run

    from flows.registry import register_build

    hashes, remote = (versions or {}).get("hashes"), (versions or {}).get("remote")
    res = register_build(
        config,
        flow_run_id=flow_run.id,
        flow_run_url=flow_run.ui_url,
        dvc_hashes=hashes,
        dvc_remote=remote,
        run_id=live_run,
    )
    get_run_logger().info("registered %s version %s: %s", res["model_name"], res["version"], res["reason"])
    return res


def with_retries(t: Any, config: BuildConfig) -> Any:
    """``t`` with the flow's retry options."""
    return t.with_options(**_backoff(config))
