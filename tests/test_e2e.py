"""End to end: the `scheduled-retrain` deployment run by a process worker against real servers on 127.0.0.1.

The stack is the compose file's, as processes: `prefect server start`, a `prefect worker` of the pool `mole-process`
and `mlflow server` (sqlite backend store, local artifacts), started with the commands of infra/commands.py. The test
deploys prefect.yaml, triggers a tiny build through the Prefect API, waits for the worker to finish it, and loads the
champion from the MLflow registry in a fresh process. Every process it started, and every process those started, is
gone when it ends (each server runs in its own process group; they all carry a token in their environment).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

from tests.servers import free_port, stop, wait_http

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOYMENT = "build-mole/scheduled-retrain"
FLOW_TIMEOUT_S = 600
PROMPTS = ["What is 12 + 30?", "Translate to French: the cat"]
TOKEN_VAR = "MOLE_E2E_TOKEN"  # every process of the stack inherits it: found again at teardown, however detached


def _commands() -> ModuleType:
    """infra/commands.py, loaded by path like tests/test_infra.py does (infra/ is not a package)."""
    spec = importlib.util.spec_from_file_location("mole_infra_commands", REPO / "infra" / "commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} not written)"


@dataclass
class Stack:
    api: str  # Prefect API URL
    mlflow: str  # MLflow tracking URI
    root: Path  # temporary directory of everything the stack writes
    env: dict[str, str]  # environment of the worker (and of the flow runs it starts)
    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    seen: dict[tuple[int, float], str] = field(default_factory=dict)  # (pid, create time) -> command line

    def token_processes(self) -> list[psutil.Process]:
        """Live processes carrying this stack's token: the servers, the worker, flow runs and their children."""
        token, found = self.env[TOKEN_VAR], []
        for p in psutil.process_iter(["environ", "status"]):
            with contextlib.suppress(psutil.Error):
                if (p.info["environ"] or {}).get(TOKEN_VAR) == token and p.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(p)
        return found

    def snapshot(self) -> None:
        """Remember every process of the stack alive now (checked again after teardown)."""
        for p in self.token_processes():
            with contextlib.suppress(psutil.Error):
                self.seen[(p.pid, p.create_time())] = " ".join(p.cmdline())[:200]

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{_tail(self.logs[name])}"


@contextlib.contextmanager
def _process(stack: Stack, name: str, cmd: list[str], *, env: dict[str, str], health: str) -> Iterator[None]:
    """Run ``cmd`` in its own process group (output to a log) until the block ends; ``health`` must answer 200."""
    log = stack.logs[name] = stack.root / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        stack.procs[name] = proc
        try:
            t0 = time.monotonic()
            wait_http(health, timeout=240, proc=proc, log=log)
            print(f"{name} answered in {time.monotonic() - t0:.1f}s")
            stack.snapshot()
            yield
        finally:
            stack.snapshot()
            stop(proc)


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> str:
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _teardown_leftovers(stack: Stack) -> list[str]:
    """End, by pid, processes of the stack that outlived their process group; say which they were."""
    left, names = stack.token_processes(), []
    for p in left:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
            p.terminate()
    _, alive = psutil.wait_procs(left, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    return names


def _exists(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Prefect server, the deployment, MLflow server and a process worker, all on 127.0.0.1; torn down after."""
    commands = _commands()
    root = tmp_path_factory.mktemp("e2e")
    prefect_port, mlflow_port, health_port = free_port(), free_port(), free_port()
    api, mlflow_uri = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base |= {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the commands name `prefect`, `mlflow`
        TOKEN_VAR: uuid.uuid4().hex,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    client_env = base | {"PREFECT_HOME": str(root / "prefect-client"), "PREFECT_API_URL": api}
    worker_env = client_env | {
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MOLE_PROJECT_DIR": str(REPO),
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-storage"),
        "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
        "PREFECT_WORKER_WEBSERVER_PORT": str(health_port),
    }
    stack = Stack(api=api, mlflow=mlflow_uri, root=root, env=worker_env, logs={})
    server_env = base | {"PREFECT_HOME": str(root / "prefect-server"), "PREFECT_UI_ENABLED": "false"}
    mlflow_cmd = commands.mlflow_server(
        backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifacts_destination=str(root / "mlartifacts"),
        allowed_hosts=f"127.0.0.1:{mlflow_port},localhost:{mlflow_port}",
        host="127.0.0.1",
        port=mlflow_port,
        workers=1,  # 2 in compose; one is enough for one worker and the test, on a 2-core machine
    )
    try:
        with contextlib.ExitStack() as servers:
            servers.enter_context(
                _process(
                    stack,
                    "prefect-server",
                    commands.prefect_server(host="127.0.0.1", port=prefect_port),
                    env=server_env,
                    health=f"{api}/health",
                )
            )
            servers.enter_context(_process(stack, "mlflow", mlflow_cmd, env=base, health=f"{mlflow_uri}/health"))
            prefect = ["prefect", "--no-prompt"]
            _run([*prefect, "work-pool", "create", commands.WORK_POOL, "--type", "process"], client_env)
            _run([*prefect, "deploy", "--name", "scheduled-retrain"], worker_env)
            servers.enter_context(
                _process(
                    stack,
                    "prefect-worker",
                    commands.prefect_worker(pool=commands.WORK_POOL, healthcheck=True),
                    env=worker_env,
                    health=f"http://127.0.0.1:{health_port}/health",
                )
            )
            yield stack
    finally:
        leftovers = _teardown_leftovers(stack)
        alive = []
        for (pid, created), cmd in stack.seen.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and _exists(p):
                    alive.append(f"{pid}: {cmd}")
        print(f"e2e stack: {len(stack.seen)} processes seen; ended by pid after their group: {leftovers or 'none'}")
        assert not alive, f"processes of the stack still alive after teardown: {alive}"
        assert not stack.token_processes(), "processes of the stack still alive after teardown"


@contextlib.contextmanager
def _client(api: str) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _wait_final(stack: Stack, run_id: Any) -> Any:
    """Poll the flow run until it is final; fail with the worker log on timeout or a dead server/worker."""
    deadline = time.monotonic() + FLOW_TIMEOUT_S
    with _client(stack.api) as c:
        while True:
            run = c.read_flow_run(run_id)
            stack.snapshot()  # the flow-run process and its children, while they run
            if run.state is not None and run.state.is_final():
                return run
            stack.check_alive()
            assert time.monotonic() < deadline, (
                f"flow run {run_id} not final after {FLOW_TIMEOUT_S}s (state {run.state}):\n"
                f"{_tail(stack.logs['prefect-worker'])}"
            )
            time.sleep(2)


def _demo_files(root: Path) -> dict[str, Path]:
    """Demo rows as local files: a fixed eval file, the first week's training rows, and the second week's (the
    first week's plus 4 new rows of each of two skills), so the retrain changes exactly two clusters."""
    from mole.data.demo import generate_demo_corpus

    by: dict[str, list[dict[str, Any]]] = {}
    for r in generate_demo_corpus(rows_per_skill=28, seed=0):
        by.setdefault(r["domain"], []).append(r)
    skills = sorted(by)
    week1 = [r for s in skills for r in by[s][4:24]]
    week2 = week1 + [r for s in skills[:2] for r in by[s][24:28]]
    files = {"eval": [r for s in skills for r in by[s][:4]], "week1": week1, "week2": week2}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {name: root / f"{name}.jsonl" for name in files}


def _trigger(stack: Stack, cfg: Any) -> tuple[Any, Any, float]:
    """A run of the deployment with ``cfg`` as its parameter, run by the worker to a final state."""
    t0 = time.monotonic()
    with _client(stack.api) as c:
        dep = c.read_deployment_by_name(DEPLOYMENT)
        run = c.create_flow_run_from_deployment(dep.id, parameters={"config": cfg.model_dump(mode="json")})
    run = _wait_final(stack, run.id)
    elapsed = time.monotonic() - t0
    print(f"flow run {run.name} ({run.id}): {run.state.name} in {elapsed:.0f}s")
    return run, dep, elapsed


def _week_config(stack: Stack, data: Path, evals: Path) -> Any:
    from mole.config import load_config

    ws, remote = stack.root / "workspace", stack.root / "dvc-remote"
    overrides = [f"workspace={ws}", f"dvc.remote={remote}", f"tracking.uri={stack.mlflow}"]
    overrides += [f"data.source={data}", f"data.eval_source={evals}", "cluster.k=6", "build.incremental=auto"]
    # The tiny preset's random model beats its baseline or not by chance; the baseline rule of the gate has its own
    # test (test_registry), and the first run must end with a champion to serve and to start the second from. Its
    # experts stay one per cluster (no merge), as an incremental build needs.
    overrides += ["tracking.require_beats_baseline=false", "merge.utilization_floor=0", "merge.similarity_ceiling=1"]
    return load_config(None, preset="tiny", overrides=overrides)


@pytest.fixture(scope="module")
def finished(stack: Stack) -> dict[str, Any]:
    """The first week's tiny build triggered through the Prefect API and run by the worker to a final state (a full
    build: no champion yet)."""
    files = _demo_files(stack.root)
    cfg = _week_config(stack, files["week1"], files["eval"])
    run, dep, elapsed = _trigger(stack, cfg)
    return {"run": run, "deployment": dep, "cfg": cfg, "ws": Path(cfg.workspace), "remote": Path(cfg.dvc.remote),
            "seconds": elapsed, "files": files}  # fmt: skip


@pytest.fixture(scope="module")
def second(stack: Stack, finished: dict[str, Any]) -> dict[str, Any]:
    """The second week's run: the same deployment and workspace, 8 more rows; it starts from the champion."""
    assert finished["run"].state.is_completed(), finished["run"].state.message
    lifecycle = finished["ws"] / "reports" / "lifecycle.json"
    first = json.loads(lifecycle.read_text(encoding="utf-8"))
    from mole.nn.lineage import model_experts

    experts = model_experts(finished["ws"] / "artifacts" / "mole").values()
    champion = {e["id"]: e["sha256"] for e in experts if e["kind"] == "expert"}  # the shared adapter aside
    cfg = _week_config(stack, finished["files"]["week2"], finished["files"]["eval"])
    run, _, elapsed = _trigger(stack, cfg)
    return {"run": run, "cfg": cfg, "first": first, "champion": champion, "seconds": elapsed}


def test_worker_runs_the_deployment_to_completion(stack: Stack, finished: dict[str, Any]) -> None:
    run, dep = finished["run"], finished["deployment"]
    assert run.state.is_completed(), (
        f"flow run {run.id} ended {run.state.name}: {run.state.message}\n"
        f"--- worker log ---\n{_tail(stack.logs['prefect-worker'])}"
    )
    assert run.deployment_id == dep.id and run.work_pool_name == "mole-process"
    assert run.infrastructure_pid, "the run was not started by the worker"  # the worker's process for the run
    assert run.parameters["config"]["workspace"] == str(finished["ws"])
    ws = finished["ws"]
    assert (ws / "artifacts/mole/mole_config.json").is_file() and (ws / "reports/eval.json").is_file()
    assert (ws / "dvc.lock").is_file(), "the build recorded nothing with DVC"
    assert any(p.is_file() for p in finished["remote"].rglob("*")), "nothing was pushed to the DVC remote"


def test_champion_in_the_registry_was_built_by_that_run(stack: Stack, finished: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    assert finished["run"].state.is_completed(), finished["run"].state.message
    name = finished["cfg"].tracking.model_name
    version = MlflowClient(stack.mlflow, registry_uri=stack.mlflow).get_model_version_by_alias(name, "champion")
    assert version.tags["mole.flow_run_id"] == str(finished["run"].id)
    assert {"champion", "challenger"} <= set(version.aliases)
    assert any(k.startswith("mole.dvc.") for k in version.tags), version.tags  # lineage: the DVC hashes


def test_champion_loads_in_a_fresh_process_and_completes_prompts(stack: Stack, finished: dict[str, Any]) -> None:
    assert finished["run"].state.is_completed(), finished["run"].state.message
    uri = f"models:/{finished['cfg'].tracking.model_name}@champion"
    script = textwrap.dedent(
        f"""
        import json, sys
        import mlflow.pyfunc, pandas as pd
        model = mlflow.pyfunc.load_model({uri!r})
        out = model.predict(pd.DataFrame({{"prompt": {PROMPTS!r}}}), params={{"max_new_tokens": 8}})
        print("COMPLETIONS=" + json.dumps(list(out)))
        """
    )
    env = stack.env | {"MLFLOW_TRACKING_URI": stack.mlflow}
    cwd = stack.root / "load"  # a fresh process outside the checkout, as a deployment would load it
    cwd.mkdir(exist_ok=True)
    res = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("COMPLETIONS="))
    completions = json.loads(line.removeprefix("COMPLETIONS="))
    # The champion is the model this run built: the same greedy completions as the workspace's model, loaded the
    # plain way (a random tiny model may well answer with blanks, so that is what is compared, not "non-empty").
    from mole.nn.model import MoLEModel

    built = MoLEModel.from_pretrained(finished["ws"] / "artifacts" / "mole")
    assert completions == built.generate_text(PROMPTS, max_new_tokens=8), completions


def test_the_second_scheduled_run_is_incremental_and_its_lifecycle_artifact_says_so(
    stack: Stack, second: dict[str, Any]
) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    run = second["run"]
    assert run.state.is_completed(), f"{run.state.message}\n--- worker log ---\n{_tail(stack.logs['prefect-worker'])}"
    assert second["first"]["mode"] == "full", second["first"]  # no champion before the first run
    ws = Path(second["cfg"].workspace)
    doc = json.loads((ws / "reports" / "lifecycle.json").read_text(encoding="utf-8"))
    name = second["cfg"].tracking.model_name
    assert doc["mode"] == "incremental" and doc["from"] == f"models:/{name}@champion", doc
    assert doc["new_rows"] == 8, doc
    champion = second["champion"]  # expert id -> content hash, in the champion's model
    experts = {e["id"]: e for e in doc["experts"] if e["id"] in champion}
    status = {i: e["status"] for i, e in experts.items()}
    assert set(experts) == set(champion), (sorted(experts), sorted(champion))
    assert "updated" in status.values() and "reused" in status.values(), status
    assert "added" not in status.values(), status  # the new rows are of known skills
    for i, e in experts.items():  # reused byte for byte: the champion's adapter, unchanged
        assert (e["sha256"] == champion[i]) == (e["status"] == "reused"), (i, e, champion[i])
    assert sum(e["new_rows"] or 0 for e in experts.values() if e["status"] == "updated") == 8, experts

    key = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") + "-lifecycle"
    with _client(stack.api) as c:
        found = c.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])
            )
        )
    assert len(found) == 1, [a.key for a in found]
    table = found[0].data if isinstance(found[0].data, list) else json.loads(found[0].data)
    shown = {row["id"]: row["status"] for row in table}
    assert {i: shown[i] for i in status} == status, shown
    assert "incremental build from models:/" in (found[0].description or ""), found[0].description
