"""The Prefect build flow against a real `prefect server start`: states, task runs, artifacts, resume after
SIGKILL, the Dask fan-out, parameter validation and the scheduled-retrain deployment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

TINY = ["--preset", "tiny", "--set", "tracking.enabled=false", "--set", "dvc.enabled=false"]


def _client():  # noqa: ANN202
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _runs_of(workspace: Path) -> list[Any]:
    """Flow runs of `build-mole` whose config names ``workspace``, oldest first."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as c:
        runs = c.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["build-mole"])),
            sort=FlowRunSort.START_TIME_ASC,
            limit=200,
        )
    return [r for r in runs if (r.parameters.get("config") or {}).get("workspace") == str(workspace)]


def _children(run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as c:
        return c.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])),
            sort=FlowRunSort.START_TIME_ASC,
            limit=200,
        )


def _task_runs(run_ids: list[Any]) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with _client() as c:
        flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        return c.read_task_runs(flow_run_filter=flow_runs, sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)


def _build(workspace: Path, api: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "mole.cli", "build", *TINY, "--set", f"workspace={workspace}", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def resumed_build(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`mole build` SIGKILLed once some experts finished, then run again to the end with the same config."""
    ws = tmp_path_factory.mktemp("flow") / "ws"
    # Experts one at a time and slow enough to be killed between them; no multitask baseline (k × steps).
    # Residual experts: one fan-out task each (cotrained ones train in one task).
    slow = ("--set", "experts.steps=12", "--set", "flow.max_workers=1", "--set", "experts.multitask_baseline=false",
            "--set", "experts.shared=residual")  # fmt: skip
    proc = _build(ws, prefect_api, *slow)
    experts = ws / "artifacts" / "experts"
    deadline = time.monotonic() + 300
    # expert_02's first checkpoint means the tasks of expert_00 and expert_01 (run one at a time) have ended.
    while not list(experts.glob("expert_02*")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no expert finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in experts.glob("expert_*/adapter_model.safetensors")}
    proc = _build(ws, prefect_api, *slow)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return {"ws": ws, "finished_before_kill": finished, "output": output, "runs": _runs_of(ws)}


def test_build_completes_with_one_task_run_per_expert_and_artifacts(resumed_build: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run = resumed_build["runs"][-1]
    assert run.state.is_completed(), run.state
    assert run.name.startswith("mole-tiny-")
    children = _children(run.id)
    ids = [run.id, *(c.id for c in children)]
    experts = json.loads((resumed_build["ws"] / "artifacts/experts/experts.json").read_text())["experts"]
    trained = sorted(t.name for t in _task_runs(ids) if t.name.startswith("train-expert_"))
    assert trained == sorted(f"train-{e['id']}" for e in experts) and len(trained) == 6
    with _client() as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    keys = {a.key for a in arts if a.key}
    assert {"mole-clusters", "mole-experts", "mole-evaluation", "mole-summary"} <= keys
    tables = {a.key: a for a in arts if a.type == "table"}
    assert len(json.loads(tables["mole-clusters"].data)) == 6
    variants = [row["variant"] for row in json.loads(tables["mole-evaluation"].data)]
    assert {"base", "oracle_experts", "cluster_routing", "mole"} <= set(variants)
    progress = [a for a in arts if a.type == "progress"]
    assert progress and all(a.data == 100.0 for a in progress), [(a.description, a.data) for a in progress]
    assert "flow run" in resumed_build["output"] and "eval_json" in resumed_build["output"]


def test_killed_build_resumes_without_retraining_finished_experts(resumed_build: dict[str, Any]) -> None:
    ws, before = resumed_build["ws"], resumed_build["finished_before_kill"]
    assert {"expert_00", "expert_01"} <= set(before) and len(before) < 6, before  # killed mid fan-out
    for name, mtime in before.items():
        assert (ws / "artifacts/experts" / name / "adapter_model.safetensors").stat().st_mtime_ns == mtime, name
    run = resumed_build["runs"][-1]
    states = {t.name: t.state for t in _task_runs([c.id for c in _children(run.id)])}
    for name in before:
        assert states[f"train-{name}"].name == "Cached", (name, states[f"train-{name}"])
    assert any(s.name == "Completed" for n, s in states.items() if n.removeprefix("train-") not in before)
    assert not list((ws / "artifacts/experts").glob("*.ckpt")) and not list((ws / "artifacts/experts").glob(".*"))


def test_expert_fanout_runs_on_a_local_dask_cluster(prefect_api: str, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from flows.build import expert_fanout, task_runner
    from mole import stages
    from mole.config import load_config

    sets = ["experts.multitask_baseline=false", "experts.steps=2", "cluster.embedder=tfidf", "flow.runner=dask",
            "experts.shared=residual"]  # fmt: skip
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={tmp_path}", *sets])
    stages.prepare(cfg)
    k = stages.cluster(cfg)["k"]
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        workers = set(client.run(os.getpid).values())
        cfg.flow.address = cluster.scheduler_address
        entries = expert_fanout.with_options(task_runner=task_runner(cfg.flow))(cfg, {"hash": "tfidf"})
    assert sorted(e["id"] for e in entries) == [*(f"expert_{c:02d}" for c in range(k)), "shared"]
    assert {e["pid"] for e in entries} <= workers and os.getpid() not in workers, (entries, workers)
    for e in entries:
        assert (tmp_path / e["path"] / "adapter_model.safetensors").is_file()


def test_bad_parameter_is_rejected_before_any_task_runs(prefect_api: str) -> None:
    from flows.build import build_mole

    state = build_mole(config={"cluster": {"k": 0}}, return_state=True)
    assert state.is_failed()
    assert "cluster" in state.message and "greater than or equal to 1" in state.message, state.message
    assert _task_runs([state.state_details.flow_run_id]) == []


def test_cli_build_rejects_a_bad_value_naming_the_field(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mole.cli", "build", *TINY, "--set", f"workspace={tmp_path}", "--set", "cluster.k=0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "cluster.k" in res.stderr, res.stderr
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def deployed(prefect_api: str) -> None:
    """The pool and prefect.yaml's `scheduled-retrain` deployment, created with the Prefect CLI."""
    from tests.conftest import REPO

    prefect = str(Path(sys.executable).parent / "prefect")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MOLE_PROJECT_DIR": str(REPO)}
    for cmd in (
        [prefect, "--no-prompt", "work-pool", "create", "mole-process", "--type", "process", "--overwrite"],
        [prefect, "--no-prompt", "deploy", "--name", "scheduled-retrain"],
    ):
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr


def test_prefect_deploy_registers_the_scheduled_retrain_deployment(deployed: None) -> None:
    from tests.conftest import REPO

    with _client() as c:
        dep = c.read_deployment_by_name("build-mole/scheduled-retrain")
        assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 1"]
        assert dep.work_pool_name == "mole-process"
        step = dep.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == str(REPO)
        schema = dep.parameter_openapi_schema
        assert "config" in schema["properties"] and "BuildConfig" in json.dumps(schema)
        assert dep.parameters["config"]["build"]["incremental"] == "auto"  # retrains start from the champion
        with pytest.raises(Exception, match="(?i)validat"):  # the server checks parameters against the schema
            c.create_flow_run_from_deployment(dep.id, parameters={"config": {"cluster": {"k": 0}}})
    # The server's scheduler turns the cron into scheduled runs (its loop for recently changed deployments runs
    # every 5 s); each is a Monday, 03:00 UTC.
    runs, deadline = [], time.monotonic() + 180
    while not runs and time.monotonic() < deadline:
        time.sleep(3)
        runs = _scheduled_runs(dep.id)
    assert runs, f"the server scheduled no run of {dep.name} within 180 s; its log may say why"
    assert all(r.expected_start_time.weekday() == 0 and r.expected_start_time.hour == 3 for r in runs), runs


def _scheduled_runs(deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
    with _client() as c:
        runs = c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=scheduled,
            limit=20,
        )
    return [r for r in runs if r.auto_scheduled]


def test_mole_trigger_starts_a_run_of_the_deployment_with_the_resolved_config(
    prefect_api: str, deployed: None, tmp_path: Path
) -> None:
    """`mole trigger` creates a flow run of the registered deployment whose parameter is the resolved config; an
    unknown deployment exits 2 naming it. No worker polls the pool here, so the run stays scheduled."""
    from tests.conftest import REPO

    mole = str(Path(sys.executable).parent / "mole")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    ws = tmp_path / "ws"
    cmd = [mole, "trigger", *TINY, "--set", f"workspace={ws}", "--set", "cluster.k=3"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    runs = _runs_of(ws)
    assert len(runs) == 1, [r.name for r in runs]
    run = runs[0]
    assert f"/runs/flow-run/{run.id}" in res.stdout + res.stderr  # the UI link
    assert run.work_pool_name == "mole-process" and run.state.is_scheduled(), (run.work_pool_name, run.state)
    assert run.parameters["config"]["cluster"]["k"] == 3 and run.parameters["config"]["base_model"]["name"] == "tiny"
    waited = subprocess.run([*cmd, "--wait", "--timeout", "4"], cwd=REPO, env=env, capture_output=True, text=True)
    assert waited.returncode == 1 and "still Scheduled after 4s" in waited.stdout + waited.stderr, waited.stderr
    with _client() as c:
        for r in _runs_of(ws):
            c.delete_flow_run(r.id)  # nothing will ever run them

    bad = subprocess.run([*cmd, "--deployment", "build-mole/no-such"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "build-mole/no-such" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
    unset = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    res = subprocess.run(cmd, cwd=REPO, env=unset, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "PREFECT_API_URL" in res.stdout + res.stderr


@pytest.mark.slow  # a second deployment through the CLI: in make test-slow, keeping make test under 10 minutes
def test_mole_deploy_prints_user_names_literally(prefect_api: str, deployed: None) -> None:
    """A deployment name with rich markup in it is printed as typed, not styled away."""
    mole = str(Path(sys.executable).parent / "mole")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    name = "nightly-[bold]x"
    res = subprocess.run([mole, "deploy", *TINY, "--name", name, "--pool", "mole-process"], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"deployment {name!r}" in " ".join((res.stdout + res.stderr).split()), res.stdout + res.stderr
    full = subprocess.run([mole, "deploy", *TINY, "--name", "every-time-full", "--pool", "mole-process", "--full"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert full.returncode == 0, full.stdout + full.stderr
    with _client() as c:
        # A scheduled retrain is incremental from the champion unless deployed with --full (params.yaml: never).
        modes = {}
        for n in (name, "every-time-full"):
            dep = c.read_deployment_by_name(f"build-mole/{n}")
            modes[n] = dep.parameters["config"]["build"]["incremental"]
            c.delete_deployment(dep.id)
    assert modes == {name: "auto", "every-time-full": "never"}, modes
    bad = subprocess.run([mole, "deploy", *TINY, "--name", "a/b", "--pool", "mole-process"], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    text = " ".join((bad.stdout + bad.stderr).split())
    assert bad.returncode == 2 and "--name 'a/b'" in text and "Traceback" not in text, text


def test_summary_values_are_shown_rounded() -> None:
    from flows.artifacts import shown

    assert shown(0.785188345) == "0.7852" and shown(6) == "6" and shown("a/b") == "`a/b`"
    assert shown({"prepare": 0.512, "cluster": 14.94}) == "prepare 0.5 s, cluster 14.9 s"
