"""A flow build as Prefect and MLflow show it while and after it runs.

Prefect: task-run inputs are the real upstream results only, the experts of the fan-out are independent of each
other, and the fan-out's subflow run is named after the build run. MLflow (a real server): the build's run exists
from the flow's start, each adapter's loss curve is there before its training task ends, and the register step
logs into that same run without logging a curve twice.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.flows.test_flow import _children, _task_runs
from tests.servers import mlflow_server

MODEL = "graph-test"


class _CurveProbe(logging.Handler):
    """On the ``flows.progress`` record of an adapter's (or the joint phase's) last step, which its trainer sends
    from inside the training task, reads the loss curve MLflow holds for it right then."""

    def __init__(self, uri: str, experiment: str) -> None:
        super().__init__()
        from mlflow import MlflowClient

        self.client, self.experiment, self.seen = MlflowClient(uri), experiment, {}
        self.bars: dict[str, tuple[int, int]] = {}  # every progress bar: its last (step, total)

    def emit(self, record: logging.LogRecord) -> None:
        name, step, total, _ = record.progress
        self.bars[name] = (step, total)
        if name in ("build", "warm-start") or name.startswith("eval ") or step < total or name in self.seen:
            return
        try:
            exp = [self.client.get_experiment_by_name(self.experiment).experiment_id]
            if name == "joint":
                (parent,) = self.client.search_runs(exp, "tags.`mole.live` = 'true'")
                run_id, key = parent.info.run_id, "router.loss"
            else:
                (run,) = self.client.search_runs(exp, f"tags.`mole.expert` = '{name}'")
                run_id, key = run.info.run_id, "loss"
            self.seen[name] = (total, sorted(m.step for m in self.client.get_metric_history(run_id, key)))
        except Exception as exc:  # noqa: BLE001 - recorded; the test reports it
            self.seen[name] = (total, repr(exc))


def _ids(task_run: Any, *params: str) -> set[Any]:
    """Ids of the runs recorded as inputs of ``task_run`` (of ``params``, or of every input)."""
    inputs = task_run.task_inputs
    return {i.id for k in (params or inputs) for i in inputs.get(k, [])}


@pytest.fixture(scope="module")
def graph(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny build with residual experts (one fan-out task each, after the shared adapter), two at a time,
    tracked on a real MLflow server."""
    from flows.build import build_mole
    from flows.tasks import PROGRESS
    from mole.config import load_config

    root = tmp_path_factory.mktemp("graph")
    ws = root / "ws"
    sets = ["dvc.enabled=false", "experts.shared=residual", "experts.steps=3", "experts.shared_steps=2",
            "router.steps=2", "flow.max_workers=2", "cluster.embedder=tfidf", "evaluate.generate_rows=2",
            "evaluate.latency_reps=1", f"tracking.model_name={MODEL}", "tracking.require_beats_baseline=false",
            "tracking.bundle_base_max_mb=0"]  # fmt: skip
    with mlflow_server(root / "mlflow", Path(sys.executable).parent) as uri:
        cfg = load_config(None, preset="tiny", overrides=[f"workspace={ws}", f"tracking.uri={uri}", *sets])
        probe = _CurveProbe(uri, cfg.tracking.experiment)
        PROGRESS.addHandler(probe)
        try:
            state = build_mole(config=cfg, return_state=True)
        finally:
            PROGRESS.removeHandler(probe)
        assert state.is_completed(), state.message
        mlflow_after = _mlflow_view(uri)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        run = c.read_flow_run(state.state_details.flow_run_id)
    children = _children(run.id)
    parent_tasks = _task_runs([run.id])
    child_tasks = _task_runs([c.id for c in children])
    return {"ws": Path(ws), "run": run, "children": children, "parent": parent_tasks, "child": child_tasks,
            "curves": probe.seen, "bars": probe.bars, "mlflow": mlflow_after, "cfg": cfg}  # fmt: skip


def _mlflow_view(uri: str) -> dict[str, Any]:
    """The registered version's run, its nested runs and the curves they hold."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    (version,) = client.search_model_versions(f"name = '{MODEL}'")
    run = client.get_run(version.run_id)
    kids = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    experts = [k for k in kids if k.data.tags.get("mole.child") == "expert"]
    history = {k.data.tags["mole.expert"]: [m.step for m in client.get_metric_history(k.info.run_id, "loss")]
               for k in experts}  # fmt: skip
    runs = client.search_runs([run.info.experiment_id])  # active (not deleted) runs
    kind = client.get_experiment(run.info.experiment_id).tags.get("mlflow.experimentKind")
    return {"run": run, "kind": kind, "experts": experts, "history": history, "all_runs": runs,
            "router": [m.step for m in client.get_metric_history(run.info.run_id, "router.loss")]}  # fmt: skip


def test_experts_depend_only_on_the_shared_adapter(graph: dict[str, Any]) -> None:
    by_name = {t.name: t for t in graph["child"]}
    shared = by_name["train-shared"]
    experts = [t for n, t in by_name.items() if n.startswith("train-expert_")]
    assert len(experts) >= 2, sorted(by_name)
    expert_ids = {t.id for t in experts}
    for t in experts:
        assert not _ids(t) & expert_ids, (t.name, t.task_inputs)  # never another expert
        assert _ids(t, "wait_for") == {shared.id}, (t.name, t.task_inputs)  # after the shared adapter
        assert _ids(t) == {shared.id}, (t.name, t.task_inputs)
    assert _ids(shared) == set(), shared.task_inputs


def test_config_is_no_task_s_upstream_and_stages_chain_by_their_results(graph: dict[str, Any]) -> None:
    tasks = [*graph["parent"], *graph["child"]]
    for t in tasks:
        assert _ids(t, "config") == set(), (t.name, t.task_inputs)
    by_name = {t.name.rsplit("-", 1)[0]: t for t in graph["parent"]}  # "cluster-f0c": task name and dynamic key
    prepare, cluster = by_name["prepare"], by_name["cluster"]
    assert _ids(prepare) == set(), prepare.task_inputs
    assert _ids(cluster) == {prepare.id}, cluster.task_inputs
    assert _ids(by_name["train-router"]) == {by_name["index-experts"].id}
    assert _ids(by_name["evaluate"]) == {by_name["train-router"].id}
    assert _ids(by_name["merge-prune"]) == {by_name["evaluate"].id}
    fanout = by_name["train-experts"]  # the subflow's task run in the build run
    assert _ids(fanout) == {cluster.id}, fanout.task_inputs
    (child,) = graph["children"]
    assert _ids(by_name["index-experts"]) == {child.id}, by_name["index-experts"].task_inputs  # the fan-out's result


def test_expert_subflow_run_is_named_after_the_build_run(graph: dict[str, Any]) -> None:
    (child,) = graph["children"]
    assert child.name == f"{graph['run'].name}-experts", (child.name, graph["run"].name)
    # its parameters are recorded as they are passed in, not as the wrappers that keep them from being inputs
    assert child.parameters["config"]["workspace"] == str(graph["ws"]), child.parameters
    assert child.parameters["clusters"]["k"] >= 2, child.parameters


def test_each_curve_is_in_mlflow_before_its_training_task_ends(graph: dict[str, Any]) -> None:
    """Read from inside each training task at its last step: every step's loss is already on the server."""
    seen, cfg = graph["curves"], graph["cfg"]
    experts = [n for n in seen if n.startswith("expert_")]
    assert len(experts) >= 2 and {"shared", "multitask_lora", "joint"} <= set(seen), sorted(seen)
    for name, (total, steps) in seen.items():
        assert steps == list(range(total)), (name, total, steps)
    assert seen["joint"][0] == cfg.router.steps and seen["shared"][0] == cfg.experts.shared_steps


def test_the_registered_run_is_the_live_one_and_no_curve_is_logged_twice(graph: dict[str, Any]) -> None:
    view, seen = graph["mlflow"], graph["curves"]
    run = view["run"]
    assert run.data.tags.get("mole.live") == "true" and run.info.status == "FINISHED", run.info
    assert run.data.tags.get("mole.flow_run_id") == str(graph["run"].id)
    assert view["kind"] == "custom_model_development"  # the UI opens the experiment on its training runs
    names = [k.data.tags["mole.expert"] for k in view["experts"]]
    assert sorted(names) == sorted(n for n in seen if n != "joint"), names  # one nested run per adapter
    for name, steps in view["history"].items():
        assert steps == list(range(seen[name][0])), (name, steps)  # the live curve, not a second copy
    assert all(k.info.status == "FINISHED" and "steps" in k.data.params for k in view["experts"])
    assert view["router"] == list(range(seen["joint"][0])), view["router"]
    parents = [r for r in view["all_runs"] if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [run.info.run_id], [r.info.run_name for r in parents]


def test_every_stage_reports_progress_to_the_terminal(graph: dict[str, Any]) -> None:
    """The records ``mole build`` draws its bars from: the build's steps, each training run, the warm start and
    each evaluated variant, every one run to its end."""
    bars = graph["bars"]
    evals = {n for n in bars if n.startswith("eval ")}
    assert {"eval base", "eval multitask_lora", "eval mole"} <= evals, sorted(bars)
    assert {"build", "warm-start", "joint", "shared", "multitask_lora"} <= set(bars), sorted(bars)
    assert all(step == total for step, total in bars.values()), bars
