"""MLflow while a build runs: the parent run is made when the flow starts, and training curves reach it live.

``start_run`` creates the build's parent run (status RUNNING) before anything trains; ``Curves`` is a trainer's
progress callback that logs each adapter's loss per step to a nested run of it (``mole.expert = <id>``, as the
register step names them) and the joint phase's loss to the parent as ``router.loss``, in batches at most every
``FLUSH_S`` seconds. The register step then logs the rest into the same runs (flows.registry). Logging is
best-effort: a tracking server that stops answering costs the live curves, never the training.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric

from flows import comparison, lineage
from flows.tracking import experiment_id, run_name, wait_for_server
from mole.config import BuildConfig
from mole.routing.warm_start import WARM
from mole.training.lora import SHARED_ID

logger = logging.getLogger(__name__)

FLUSH_S = 1.0  # most seconds a logged step waits before it is sent
JOINT = "joint"  # the progress name of the joint router + experts phase: its curve goes to the parent run
ROUTER_KEY = "router.loss"
EXPERT_TAG = "mole.expert"
LIVE_TAG = "mole.live"  # on a parent run made at flow start: "true"
RUN_NAMES = {"cotrained": SHARED_ID}  # progress names that are not the adapter's id
NOT_CURVES = (WARM,)  # progress names that are no training run


def start_run(cfg: BuildConfig, *, flow_run_id: str | None = None) -> str | None:
    """Create the build's parent run (RUNNING) in ``tracking.experiment``; its id, or None when the tracking server
    does not answer now (the register step then makes the run, and checks the server again with retries)."""
    uri = lineage.tracking_uri(cfg)
    try:
        wait_for_server(uri, attempts=1)
        client = MlflowClient(uri)
        exp_id = experiment_id(client, cfg.tracking.experiment)
        tags = {LIVE_TAG: "true", "mole.flow_run_id": flow_run_id or "none"}
        return client.create_run(exp_id, run_name=run_name(cfg), tags=tags).info.run_id
    except Exception as exc:  # noqa: BLE001 - the build goes on without live curves
        logger.warning("MLflow at %s: no live run (%s); the build is logged when it registers", uri, exc)
        return None


def end_run(cfg: BuildConfig, run_id: str | None, status: str) -> None:
    """Mark the parent run (and live nested runs still running) ``status``; best-effort."""
    if run_id is None:
        return
    try:
        client = MlflowClient(lineage.tracking_uri(cfg))
        for child in children(client, run_id):
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, status)
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001
        logger.warning("MLflow: could not mark run %s %s: %s", run_id, status, exc)


def discard_run(cfg: BuildConfig, run_id: str) -> None:
    """Delete a live parent run and its nested runs (a build found already registered logs nothing new)."""
    client = MlflowClient(lineage.tracking_uri(cfg))
    for child in children(client, run_id):
        client.delete_run(child.info.run_id)
    client.delete_run(run_id)


def children(client: MlflowClient, run_id: str, *, kind: str | None = None) -> list[Any]:
    """The nested runs of ``run_id`` (of tag ``mole.child = kind`` when given)."""
    exp_id = client.get_run(run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{run_id}'" + (f" and tags.`{comparison.KIND_TAG}` = '{kind}'" if kind else "")
    return list(client.search_runs([exp_id], filter_string=query, max_results=1000))


def expert_runs(client: MlflowClient, run_id: str) -> dict[str, str]:
    """{adapter id: nested run id} of the adapters whose curves were logged live under ``run_id``."""
    return {r.data.tags[EXPERT_TAG]: r.info.run_id for r in children(client, run_id, kind="expert")}


class Curves:
    """A ``progress(name, step, total, loss)`` callback that logs the loss curves under the live parent run.

    Thread-safe (the thread runner trains several adapters in one process); a name first seen at its last step
    (an adapter reused, not trained) gets no run: the register step logs its recorded curve.
    """

    def __init__(self, cfg: BuildConfig, parent_id: str) -> None:
        self.client = MlflowClient(lineage.tracking_uri(cfg))
        self.parent_id = parent_id
        self.runs: dict[str, str] = {}
        self.last: dict[str, int] = {}  # last step buffered per name
        self.pending: dict[str, list[Metric]] = {}
        self.sent = time.monotonic()
        self.lock = threading.Lock()
        self.broken = False

    def __call__(self, name: str, step: int, total: int, loss: float) -> None:
        name = RUN_NAMES.get(name, name)
        if name in NOT_CURVES or not math.isfinite(loss):
            return
        with self.lock:
            if self.broken or step <= self.last.get(name, 0) or (name not in self.last and step >= total > 1):
                return
            self.last[name] = step
            key = ROUTER_KEY if name == JOINT else "loss"
            # step - 1: the recorded curves (train_metrics.json) are indexed from 0, and the register step logs them so
            self.pending.setdefault(name, []).append(Metric(key, float(loss), int(time.time() * 1000), step - 1))
            if step >= total or time.monotonic() - self.sent >= FLUSH_S:
                self._flush(finished=name if step >= total else None)

    def _flush(self, finished: str | None) -> None:
        try:
            for name, metrics in self.pending.items():
                run_id = self._run(name)
                for i in range(0, len(metrics), 1000):  # MLflow's batch limit
                    self.client.log_batch(run_id, metrics=metrics[i : i + 1000])
            if finished is not None and finished != JOINT and finished in self.runs:
                self.client.set_terminated(self.runs[finished])
        except Exception as exc:  # noqa: BLE001 - training goes on; the register step logs the curves
            logger.warning("MLflow: live curves stopped (%s); the register step logs them", exc)
            self.broken = True
        self.pending, self.sent = {}, time.monotonic()

    def _run(self, name: str) -> str:
        if name == JOINT:
            return self.parent_id
        if name not in self.runs:
            exp_id = self.client.get_run(self.parent_id).info.experiment_id
            tags = {"mlflow.parentRunId": self.parent_id, EXPERT_TAG: name, comparison.KIND_TAG: "expert"}
            self.runs[name] = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        return self.runs[name]
