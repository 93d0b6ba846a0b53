"""MLflow tracking of a build: the server check, the fluent API pointed at one URI, the build's runs and tags."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from flows import comparison, lineage
from mole.config import BuildConfig
from mole.workspace import eval_paths, mole_paths

logger = logging.getLogger(__name__)

BACKOFF_S = 1.0  # first wait between attempts to reach the server; doubles each time


def wait_for_server(uri: str, *, attempts: int, backoff_s: float | None = None) -> None:
    """Check that an http(s) tracking server answers, retrying with doubling waits; local stores pass at once.

    Raises:
        RuntimeError: naming the URI and the last error, after ``attempts`` failed attempts.
    """
    if not uri.startswith(("http://", "https://")):
        return
    wait, last = BACKOFF_S if backoff_s is None else backoff_s, None
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
                return
        except urllib.error.HTTPError as exc:  # the server answered: reachable, even without /health
            if exc.code < 500:
                return
            last = exc
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        logger.warning("tracking server %s: attempt %d/%d failed: %s", uri, attempt, attempts, last)
        if attempt < attempts:
            time.sleep(wait)
            wait *= 2
    raise RuntimeError(
        f"MLflow tracking server {uri} is unreachable after {attempts} attempts ({last}); nothing was registered. "
        "Start the server, or set tracking.uri / MLFLOW_TRACKING_URI to a reachable one"
    )


@contextlib.contextmanager
def tracking_to(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block, then restore exactly what was there before.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` also write MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into
    os.environ, so those are restored too: registering must not redirect the caller's later runs or subprocesses.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    old = (tracking_utils._tracking_uri, registry_utils._registry_uri)  # None when never set
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old[0])
        mlflow.set_registry_uri(old[1])
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # the UI opens on training runs, not GenAI


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, made when missing; tagged as model training so the MLflow UI opens it on its
    training runs (an experiment's kind the user set is left as it is)."""
    experiment = client.get_experiment_by_name(name)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(name)
    if experiment is None or KIND_TAG not in experiment.tags:
        client.set_experiment_tag(exp_id, KIND_TAG, KIND)
    return exp_id


def log_build_run(
    cfg: BuildConfig,
    client: MlflowClient,
    run_id: str,
    experiment_id: str,
    build: dict,
    *,
    live_experts: dict[str, str] | None = None,
) -> None:
    """Params (the flattened config), the registered variant's metrics, router loss curve, report files, datasets,
    the eval rows table, one nested run per eval variant (flows.comparison) and one per expert.

    ``live_experts`` ({adapter id: nested run id}) are expert runs whose loss curves were logged as they trained
    (flows.live): they get the rest of their record, not their curve again; so does a router curve logged live.
    """
    live_experts = live_experts or {}
    mlflow.log_params(lineage.flatten(cfg.model_dump(mode="json")))
    router = mole_paths(cfg)["metrics"]
    joint = (json.loads(router.read_text(encoding="utf-8")).get("joint") or {}) if router.exists() else {}
    scalars = comparison.parent_metrics(build["report"], build["variant"])
    router_live = bool(client.get_metric_history(run_id, "router.loss"))
    log_metric_batch(client, run_id, scalars | {"registered." + build["metric"]: build["value"]},
                     {} if router_live else {"router.loss": joint.get("loss", [])})  # fmt: skip
    comparison.log_datasets(cfg)
    comparison.log_eval_table(cfg, run_id)
    comparison.log_variant_runs(client, run_id, experiment_id, build)
    reports = eval_paths(cfg)
    for f in sorted([*reports["dir"].glob("*.png"), *(reports[k] for k in ("eval", "markdown", "merge_prune"))]):
        if f.exists():
            client.log_artifact(run_id, str(f), artifact_path="reports")
    for rec in lineage.expert_records(cfg):
        child_id = live_experts.get(rec["id"])
        if child_id is None:
            tags = {"mlflow.parentRunId": run_id, "mole.expert": rec["id"], comparison.KIND_TAG: "expert"}
            child_id = client.create_run(experiment_id, run_name=rec["id"], tags=tags).info.run_id
        client.log_batch(child_id, params=[Param(k, v) for k, v in rec["params"].items()])
        log_metric_batch(client, child_id, rec["metrics"], {} if rec["id"] in live_experts else {"loss": rec["loss"]})
        client.set_terminated(child_id)


def log_metric_batch(client: MlflowClient, run_id: str, values: dict[str, float], series: dict) -> None:
    """Scalars at step 0 and per-step series (name -> list) in as few requests as MLflow allows."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items()]
    metrics += [Metric(k, float(x), now, step) for k, xs in series.items() for step, x in enumerate(xs)]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def lineage_tags(
    cfg: BuildConfig, build: dict[str, Any], flow_run_id: str | None, flow_run_url: str | None
) -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    tags = {
        "mole.build_key": build["key"],
        "mole.config_hash": build["config_hash"],
        "mole.model_hash": build["model_hash"],
        "mole.data_hash": build["data_hash"],
        "mole.eval_set_hash": build["eval_set_hash"],
        "mole.variant": build["variant"],
        "mole.metric": build["metric"],
        "mole.metric_value": repr(build["value"]),
        "mole.base_model": cfg.base_model.name,
        "mole.git_commit": lineage.git_commit(cfg.workspace, repo) or "none",
        "mole.flow_run_id": flow_run_id or "none",
    }
    if comparison.valid_url(flow_run_url):
        tags["mole.flow_run_url"] = flow_run_url
    tags |= {f"mole.dvc.{path}": md5 for path, md5 in build["dvc"].items()}
    return tags


def run_name(cfg: BuildConfig) -> str:
    return f"mole-{Path(cfg.base_model.name).name}-{time.strftime('%Y%m%d-%H%M%S')}"
