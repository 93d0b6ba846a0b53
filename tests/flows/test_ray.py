"""The expert fan-out on a real Ray cluster (flows/runners.py): a `ray start` head on this machine, the flow's
experts submitted through prefect-ray, each in a Ray worker with the CPUs it asked for, its task run on the flow's
Prefect server; a request no node fits fails at once instead of pending forever. The head's processes are all gone
after teardown (tests/ray_head.py checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.ray_head import RayHead, ray_head

pytestmark = pytest.mark.e2e

TINY = ["experts.multitask_baseline=false", "experts.steps=2", "experts.shared=residual", "cluster.embedder=tfidf",
        "cluster.k=3", "router.steps=2", "evaluate.generate_rows=2", "tracking.enabled=false", "dvc.enabled=false",
        "flow.runner=ray"]  # fmt: skip

# The fan-out as `mole build` runs it by default: PREFECT_API_URL unset, the flow on a temporary Prefect server of its
# process. Prints the fan-out's results and the task runs that server holds for it.
FANOUT = textwrap.dedent("""
    import json, sys
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from flows.build import expert_fanout
    from flows.runners import task_runner
    from mole import stages
    from mole.config import load_config

    cfg = load_config(None, preset="tiny", overrides=json.loads(sys.argv[1]))
    stages.prepare(cfg)
    stages.cluster(cfg)
    state = expert_fanout.with_options(task_runner=task_runner(cfg.flow))(cfg, {"hash": "tfidf"}, return_state=True)
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=flow_run)
    print("RESULT", json.dumps({"entries": state.result(), "task_runs": {r.name: r.state.name for r in runs},
                                "api": str(c.api_url)}))
""")


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    """A 2-CPU Ray head whose workers import this checkout; no Prefect setting in its environment (a worker runs its
    task with the settings of the flow that submitted it)."""
    pytest.importorskip("prefect_ray", reason="the ray extra: pip install -c constraints.txt -e '.[dev,ray]'")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with ray_head(num_cpus=2, env=env, bin_dir=Path(sys.executable).parent) as h:
        yield h


def _overrides(tmp_path: Path, head: RayHead, *sets: str) -> list[str]:
    return [f"workspace={tmp_path}", *TINY, f"flow.address={head.address}", *sets]


def _watch(head: RayHead, done: threading.Event) -> None:
    while not done.wait(0.2):
        head.snapshot()


def test_expert_fanout_runs_in_ray_workers_with_the_cpus_it_asks_for(head: RayHead, tmp_path: Path) -> None:
    # Half a CPU each (Ray's default is 1): what Ray reserved shows whether flow.cpus_per_expert reached it.
    overrides = _overrides(tmp_path, head, "flow.cpus_per_expert=0.5")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(tmp_path / "ph"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }  # as mole's CLI sets: a loaded machine is slow
    # A job's workers end with it, when the fan-out returns: note the head's processes while it runs.
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(head, done))
    watcher.start()
    try:
        res = subprocess.run([sys.executable, "-c", FANOUT, json.dumps(overrides)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    finally:
        done.set()
        watcher.join()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    out = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    entries = out["entries"]
    assert sorted(e["id"] for e in entries) == ["expert_00", "expert_01", "expert_02", "shared"]
    workers = {pid for (pid, _), title in head.seen.items() if title.startswith("ray::")}
    assert {e["pid"] for e in entries} <= workers, (entries, head.seen)
    assert all(e["resources"] == {"CPU": 0.5} for e in entries), [e["resources"] for e in entries]
    # The workers report to the flow's server: they start no temporary Prefect server of their own (with the flow's
    # settings and no PREFECT_API_URL, each would; those servers share its database file, so its task runs still show).
    servers = [cmd for cmd in head.seen.values() if "prefect.server.api.server" in cmd]
    assert not servers, servers
    trained = {n: s for n, s in out["task_runs"].items() if n.startswith("train-")}
    assert trained == {f"train-{e['id']}": "Completed" for e in entries}, (out["task_runs"], out["api"])
    for e in entries:
        assert (tmp_path / e["path"] / "adapter_model.safetensors").is_file()


def test_a_gpu_request_no_node_fits_fails_at_once_naming_it(prefect_api: str, head: RayHead, tmp_path: Path) -> None:
    """Ray itself would keep the tasks pending forever on this CPU-only head."""
    from flows.build import expert_fanout
    from flows.runners import task_runner
    from mole import stages
    from mole.config import load_config

    cfg = load_config(None, preset="tiny", overrides=_overrides(tmp_path, head, "flow.gpus_per_expert=1"))
    stages.prepare(cfg)
    stages.cluster(cfg)
    with pytest.raises(ValueError, match=r"flow\.gpus_per_expert = 1: no node of the Ray cluster .*GPU 0"):
        expert_fanout.with_options(task_runner=task_runner(cfg.flow))(cfg, {"hash": "tfidf"})
    assert not list((tmp_path / "artifacts/experts").glob("*/adapter_model.safetensors"))
