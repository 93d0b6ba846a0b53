"""The Prefect graph of a build: task-run inputs are the real upstream results only, the experts of the fan-out
are independent of each other, and the fan-out's subflow run is named after the build run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.flows.test_flow import _children, _task_runs


def _ids(task_run: Any, *params: str) -> set[Any]:
    """Ids of the runs recorded as inputs of ``task_run`` (of ``params``, or of every input)."""
    inputs = task_run.task_inputs
    return {i.id for k in (params or inputs) for i in inputs.get(k, [])}


@pytest.fixture(scope="module")
def graph(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny build with residual experts (one fan-out task each, after the shared adapter), two at a time."""
    from flows.build import build_mole
    from mole.config import load_config

    ws = tmp_path_factory.mktemp("graph") / "ws"
    sets = ["tracking.enabled=false", "dvc.enabled=false", "experts.shared=residual", "experts.steps=2",
            "experts.shared_steps=2", "router.steps=2", "flow.max_workers=2", "cluster.embedder=tfidf"]  # fmt: skip
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={ws}", *sets])
    state = build_mole(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        run = c.read_flow_run(state.state_details.flow_run_id)
    children = _children(run.id)
    parent_tasks = _task_runs([run.id])
    child_tasks = _task_runs([c.id for c in children])
    return {"ws": Path(ws), "run": run, "children": children, "parent": parent_tasks, "child": child_tasks}


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
