"""The ``build_mole`` Prefect flow: prepare → cluster → one expert per cluster (in parallel) → joint router
training → evaluate → merge/prune → DVC record → MLflow register.

Its one parameter is the pydantic ``BuildConfig``, so the UI and deployments validate it before anything runs.
Tasks pass configs, paths and small dicts, never models.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from prefect import Flow, flow, get_run_logger
from prefect.futures import wait
from prefect.utilities.annotations import BaseAnnotation, opaque, quote

from flows import artifacts, tasks
from flows.cache import outputs_exist
from flows.runners import expert_resources, task_runner
from mole import workspace
from mole.config import BuildConfig
from mole.stages.registry import STAGES
from mole.training.experts import BASELINE_ID, SHARED_ID, job_names


def _adapter_dir(config: BuildConfig, name: str) -> Path:
    e = config.experts
    return config.path(e.baseline_dir if name == BASELINE_ID else f"{e.out_dir}/{name}")


def _fresh(task: Any, config: BuildConfig, stage: str | None = None) -> Any:
    """``task`` (of registered stage ``stage``, by default the task's name), refreshing its cache entry when the
    stage's outputs (``STAGES[stage].done``) are not on disk: deleted since it was cached."""
    outputs = STAGES[stage or task.name].done(config)
    return task.with_options(refresh_cache=not outputs_exist(outputs))


# Prefect records a task run's inputs by walking its arguments and matching the id() of every object in them
# against the results (and their members) that earlier tasks of the flow run returned. Config strings that a stage
# echoes back ('demo', the embedder's name, interned literals) made `config` look like the output of prepare or
# cluster, and a value of `clusters` equal by identity to one in an expert's returned entry made each expert look
# like the input of the next (expert_00 → expert_02 → ...), though they are independent. So `config` (and other
# constants) go in as `quote` (not walked, no input) and upstream results as `opaque` (the result itself is the
# input, its members are not walked); the task receives the plain values either way, and cache keys see them.
def _call(task: Any, config: BuildConfig, *upstream: Any, **constants: Any) -> Any:
    """``task(config, *upstream, **constants)`` with only ``upstream`` recorded as its inputs; the build's progress
    bar says which step runs."""
    _step(task.name)
    return task(quote(config), *map(opaque, upstream), **{k: quote(v) for k, v in constants.items()})


# The steps of a build in order, for its progress bar (``mole build``): the fan-out and the packed run both count
# as train-experts, and a build without DVC or tracking skips the last three.
STEPS = ("prepare", "cluster", "train-experts", "train-router", "evaluate", "merge-prune", "check-tracking",
         "record-outputs", "register")  # fmt: skip


def _step(name: str) -> None:
    name = {"train-experts-packed": "train-experts", "index-experts": "train-experts"}.get(name, name)
    if name in STEPS:
        tasks.report_progress("build", STEPS.index(name), len(STEPS), name)


def _plain(value: Any) -> Any:
    return value


class _Subflow(Flow):
    """A flow whose run records its parameters without their ``quote``/``opaque`` wrappers (those only keep the
    subflow's task run in the parent from recording false inputs)."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        plain = {k: v.unwrap() if isinstance(v, BaseAnnotation) else v for k, v in parameters.items()}
        return super().serialize_parameters(plain)

    def with_options(self, **options: Any) -> Any:
        new = super().with_options(**options)
        new.__class__ = _Subflow
        return new


def _fanout(config: BuildConfig, clusters: dict[str, Any], live_run: str | None = None) -> list[dict[str, Any]]:
    """Train one adapter per cluster (and the multitask baseline) in parallel on the configured task runner; their
    loss curves go to nested runs of MLflow run ``live_run`` as they train.

    Raises:
        RuntimeError: naming every adapter whose training failed; the finished ones stay on disk.
    """
    names = job_names(config)
    # Dask and Ray rebuild the tuples in a task's arguments, Prefect's annotations (NamedTuples) among them, so there
    # the arguments go plain: the experts run in other processes, and their unpickled results share no objects
    # with config or clusters.
    const = quote if config.flow.runner == "threads" else _plain

    def submit(n: str, after: list[Any]) -> Any:
        done = outputs_exist([_adapter_dir(config, n) / "adapter_model.safetensors"])
        task = tasks.train_expert.with_options(refresh_cache=not done)
        return task.submit(const(config), const(n), const(clusters), const(live_run), wait_for=after)

    with expert_resources(config.flow):
        # The shared adapter first: every expert starts from it (seed) or trains on top of it (residual); the
        # multitask baseline needs nothing and runs beside it.
        shared = [submit(n, []) for n in names if n == SHARED_ID]
        futures = [*shared, *(submit(n, [] if n == BASELINE_ID else shared) for n in names if n != SHARED_ID)]
    names = [*(n for n in names if n == SHARED_ID), *(n for n in names if n != SHARED_ID)]
    wait(futures)
    failed = [f"{n}: {f.state.message}" for n, f in zip(names, futures, strict=True) if not f.state.is_completed()]
    if failed:
        raise RuntimeError(f"training failed for {len(failed)} of {len(names)} adapters: " + "; ".join(failed))
    return [f.result() for f in futures]


expert_fanout = _Subflow(_fanout, name="train-experts", validate_parameters=False)


def _run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    cfg = config if isinstance(config, BuildConfig) else BuildConfig.model_validate(config or {})
    base = Path(cfg.base_model.name).name.replace("/", "-")
    return cfg.flow.run_name.format(base=base, date=dt.datetime.now().strftime("%Y%m%d-%H%M%S"))


def _fanout_name() -> str:
    """The expert fan-out's run name: the build run's, suffixed."""
    from prefect.runtime import flow_run

    return f"{flow_run.name}-experts"


@flow(name="build-mole", flow_run_name=_run_name)
def build_mole(config: BuildConfig = BuildConfig()) -> dict[str, Any]:  # noqa: B008 - pydantic default, immutable use
    """Build a MoLE model from domain data and a base causal LM, evaluate it, version it and register it.

    With tracking on, the build's MLflow run starts with the flow, so training curves show in MLflow as they grow.
    """
    live_run = None
    if config.tracking.enabled:
        from prefect.runtime import flow_run

        from flows import live

        live_run = live.start_run(config, flow_run_id=flow_run.id)
    try:
        return _build(config, live_run)
    except BaseException:
        if live_run is not None:
            live.end_run(config, live_run, "FAILED")
        raise


def _build(config: BuildConfig, live_run: str | None) -> dict[str, Any]:
    log, name = get_run_logger(), config.tracking.model_name
    prepared = _call(_fresh(tasks.prepare, config), config)
    previous = (
        _call(tasks.with_retries(tasks.fetch_previous, config), config) if config.build.incremental != "never" else None
    )
    if previous and previous["ref"] != config.build.previous:  # auto: the champion found in the registry
        config = config.model_copy(update={"build": config.build.model_copy(update={"previous": previous["ref"]})})
    clusters = _call(_fresh(tasks.cluster, config), config, prepared, previous)
    artifacts.clusters_table(clusters, name=name)
    index = workspace.experts_paths(config)["index"]
    if config.experts.mode == "packed" or config.experts.shared == "cotrained":  # one run trains every expert
        packed = _fresh(tasks.train_experts_packed, config, "train-experts")
        experts = _call(packed, config, clusters, live_run=live_run)
    else:
        t0 = time.perf_counter()  # the fan-out is the train-experts stage of a flow build
        _step("train-experts")
        fanout = expert_fanout.with_options(task_runner=task_runner(config.flow), flow_run_name=_fanout_name())
        entries = fanout(quote(config), opaque(clusters), quote(live_run))
        experts = _call(_fresh(tasks.index_experts, config, "train-experts"), config, entries)
        workspace.record_stage_time(config, "train-experts", time.perf_counter() - t0)
    artifacts.experts_table(index, name=name)
    model = _call(_fresh(tasks.train_router, config), config, experts, live_run=live_run)
    reports = workspace.eval_paths(config)
    report = _call(_fresh(tasks.evaluate, config), config, model)
    merged = _call(_fresh(tasks.merge_prune, config), config, report)
    artifacts.evaluation_table(reports["eval"], name=name)
    artifacts.lifecycle_table(config, name=name)  # after merge-prune: retired and merged experts too
    if config.tracking.enabled:  # reachable before DVC commits and pushes anything for a build it can't register
        _call(tasks.check_tracking, config, merged)
    versions = _call(tasks.with_retries(tasks.record_outputs, config), config, merged) if config.dvc.enabled else None
    registered = None
    if config.tracking.enabled:
        registered = _call(tasks.with_retries(tasks.register, config), config, merged, versions, live_run=live_run)
        artifacts.tracking_link(registered, name=name)
    summary = _summary(config, clusters, model, report, registered)
    artifacts.summary_markdown(summary, name=name)
    tasks.report_progress("build", len(STEPS), len(STEPS), "done")
    loss = summary["mole_loss"]
    log.info("build finished: k=%s, mole loss %s; the summary is the run's artifact", summary["k"],
             f"{loss:.4f}" if isinstance(loss, float) else loss)  # fmt: skip
    return summary


def _summary(config: BuildConfig, clusters: dict, model: dict, report: dict, registered: dict | None) -> dict:
    mole = report["variants"].get("mole", {})
    out = {
        "k": clusters["k"],
        "router_agreement": model["agreement"],
        "mole_loss": mole.get("loss"),
        "mole_exact_match": mole.get("exact_match"),
        "stage_seconds": (report.get("cost", {}).get("build_time") or {}).get("stages"),
        "training_fraction": (report.get("cost", {}).get("build_time") or {}).get("training_fraction"),
        "model_dir": str(workspace.mole_paths(config)["dir"]),
        **artifacts.report_paths(config),
    }
    if registered:
        out |= {k: registered.get(k) for k in ("model_uri", "version", "champion", "tracking_uri", "run_url")}
    return out
