"""Faults, in one place: every stage killed at its writes' commit points and re-run; damaged inputs named.

A stage is SIGKILLed just before one of its ``os.replace`` calls (tests/crashpoint.py), the commit of every atomic
write: on a first run, and on a re-run over existing outputs between the two renames of a directory swap. The
re-run must then finish with outputs equal to those of an uninterrupted run, and leave no temp behind. Damaged
inputs of each stage (truncated weights, a cut JSON line, a stale upstream) fail naming the file and what to re-run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
ARGS = ["--preset", "tiny", "--set", "experts.multitask_baseline=false", "--set", "evaluate.generate_rows=4",
        "--set", "evaluate.latency_reps=1", "--set", "merge.utilization_floor=0.3"]  # fmt: skip
# stage -> (its outputs, the name its final swap renames into place)
STAGES = {
    "prepare": (["data/prepared"], "prepared"),
    "cluster": (["data/clusters"], "clusters"),
    "train-experts": (["artifacts/experts"], "experts.json"),
    "train-router": (["artifacts/mole"], "mole"),
    "evaluate": (["reports/eval.json"], "eval.json"),
    "merge-prune": (["artifacts/mole", "reports/merge_prune.json"], "merge_prune.json"),
}
ORDER = list(STAGES)
# Values that differ between two uninterrupted runs (wall time, whether an adapter was reused or resumed).
VOLATILE = {"seconds", "tokens_per_s", "reused", "resumed_from", "cost", "verdict", "latency_ms", "elapsed_s"}


def run(ws: Path, stage: str, *extra: str, kill: str = "0", log: Path | None = None) -> subprocess.CompletedProcess:
    log = log or ws / f".calls-{stage}.log"
    cmd = [sys.executable, str(HERE / "crashpoint.py"), kill, str(log), "--", stage, *ARGS, *extra]
    return subprocess.run(cmd, cwd=ws, env=ENV, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.umask(0o022))  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _strip(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def outputs(ws: Path, stage: str) -> dict[str, object]:
    """The stage's outputs, comparable across runs: bytes of weights and data, JSON without timings."""
    found: dict[str, object] = {}
    for rel in STAGES[stage][0]:
        root = ws / rel
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_dir() or path.suffix in (".png", ".md"):
                continue
            key = str(path.relative_to(ws))
            found[key] = _strip(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    assert found, f"{stage}: no outputs under {STAGES[stage][0]}"
    return found


def leftovers(ws: Path) -> list[str]:
    return [str(p.relative_to(ws)) for p in ws.rglob(".mole-tmp-*")]


def calls(log: Path) -> list[tuple[int, str, str]]:
    out = []
    for line in log.read_text().splitlines():
        n, rest = line.split(" ", 1)
        src, dst = rest.split(" -> ")
        out.append((int(n), src, dst))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One uninterrupted run of every stage: the workspace before each stage, its outputs and its commit points."""
    root = tmp_path_factory.mktemp("faults")
    ws, before, outs, points = root / "ws", {}, {}, {}
    ws.mkdir()
    for stage in ORDER:
        before[stage] = root / f"before-{stage}"
        shutil.copytree(ws, before[stage])
        ok(run(ws, stage, log=root / f"{stage}.log"))
        outs[stage] = outputs(ws, stage)
        points[stage] = calls(root / f"{stage}.log")
    return {"root": root, "before": before, "after": ws, "outputs": outs, "points": points}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for log in dst.glob(".calls-*"):
        log.unlink()
    return dst


FIRST_RUN = [
    pytest.param(s, where, marks=[] if (s, where) == ("prepare", "last") else [pytest.mark.slow])
    for s in ORDER for where in ("first", "middle", "last")
]  # fmt: skip


@pytest.mark.parametrize(("stage", "where"), FIRST_RUN)
def test_a_stage_killed_on_its_first_run_reruns_to_the_same_outputs(
    reference: dict, tmp_path: Path, stage: str, where: str
) -> None:
    points = reference["points"][stage]
    assert points, f"{stage} made no atomic write"
    n = {"first": 1, "middle": (len(points) + 1) // 2, "last": len(points)}[where]
    ws = _copy(reference["before"][stage], tmp_path / "ws")
    killed = run(ws, stage, kill=str(n))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ok(run(ws, stage))
    assert outputs(ws, stage) == reference["outputs"][stage]
    assert leftovers(ws) == []


# every swap kill is in make test-faults (and test-slow); make test keeps the kill of prepare's first run (FIRST_RUN)
SWAPS = [pytest.param(s, marks=[pytest.mark.slow]) for s in ORDER]


@pytest.mark.parametrize("stage", SWAPS)
def test_a_rerun_killed_between_the_renames_of_its_swap_is_recovered(
    reference: dict, tmp_path: Path, stage: str
) -> None:
    """A re-run over existing outputs, killed as the new version is renamed into place (the old one moved aside)."""
    ws = _copy(reference["before"][stage], tmp_path / "ws")
    ok(run(ws, stage))  # the outputs now exist, as after any earlier build
    if stage == "merge-prune":
        shutil.rmtree(ws / "artifacts" / "mole")  # merge-prune replaces the model: re-run it from the unmerged one
        shutil.copytree(reference["before"][stage] / "artifacts" / "mole", ws / "artifacts" / "mole")
    log = ws / ".calls-swap.log"
    name = STAGES[stage][1]
    # Find the rename that puts the new version in place, from an uninterrupted re-run on a copy.
    probe = _copy(ws, tmp_path / "probe")
    ok(run(probe, stage, log=log))
    swap = [n for n, src, dst in calls(log) if Path(dst).name == name and Path(src).name.startswith(".mole-tmp-")]
    assert swap, f"{stage}: no swap into {name}"
    killed = run(ws, stage, kill=str(swap[-1]))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert leftovers(ws), "the kill left nothing to recover: it did not land mid-swap"
    ok(run(ws, stage))
    assert outputs(ws, stage) == reference["outputs"][stage]
    assert leftovers(ws) == []


# ------------------------------------------------------------------------------------- damaged or stale inputs
def _damage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("stage", "damaged", "message"),
    [("cluster", "data/prepared/train.jsonl", r"data/prepared/train\.jsonl:\d+: damaged"),
     ("train-experts", "data/clusters/assignments.jsonl", r"data/clusters/assignments\.jsonl:\d+: damaged"),
     ("train-router", "artifacts/experts/expert_00/adapter_model.safetensors",
      r"expert_00: .*adapter_model\.safetensors does not match the digest.*re-run `mole train-experts`"),
     ("evaluate", "artifacts/mole/router.safetensors", r"artifacts/mole/router\.safetensors: cannot read the weights"),
     ("evaluate", "artifacts/mole/mole_config.json", r"artifacts/mole/mole_config\.json: not a valid MoLE model"),
     ("merge-prune", "artifacts/mole/experts/expert_00/adapter_model.safetensors",
      r"experts/expert_00/adapter_model\.safetensors: cannot read the weights")],
)  # fmt: skip
def test_a_damaged_input_is_named_and_nothing_is_written(
    reference: dict, tmp_path: Path, stage: str, damaged: str, message: str
) -> None:
    ws = _copy(reference["before"][stage], tmp_path / "ws")
    _damage(ws / damaged)
    proc = run(ws, stage)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(message, " ".join(proc.stderr.split())), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for rel in STAGES[stage][0]:  # the stage's own outputs are as they were (absent on a first run)
        assert (ws / rel).exists() == (reference["before"][stage] / rel).exists()


@pytest.mark.slow  # a train-experts rerun: in make test-faults, keeping make test under 10 minutes
def test_a_truncated_expert_is_trained_again_not_reused(reference: dict, tmp_path: Path) -> None:
    ws = _copy(reference["before"]["train-router"], tmp_path / "ws")
    weights = ws / "artifacts" / "experts" / "expert_00" / "adapter_model.safetensors"
    _damage(weights)
    proc = ok(run(ws, "train-experts"))
    assert "training it again" in " ".join(proc.stderr.split())
    assert outputs(ws, "train-experts") == reference["outputs"]["train-experts"]


@pytest.mark.slow  # 36 s of subprocess stages: in make test-faults (and test-slow), keeping make test under 10 minutes
def test_train_router_and_evaluate_refuse_outputs_of_other_clusters(reference: dict, tmp_path: Path) -> None:
    """Re-clustering (other k) after train-experts: train-router names the stale experts; no KeyError, no exit 0."""
    ws = _copy(reference["before"]["train-router"], tmp_path / "ws")
    ok(run(ws, "cluster", "--set", "cluster.k=3"))
    for extra in ([], ["--set", "router.warm_start=false"]):
        proc = run(ws, "train-router", "--set", "cluster.k=3", *extra)
        text = " ".join(proc.stderr.split())
        assert proc.returncode == 1 and "re-run `mole train-experts`" in text, text[-2000:]
        assert "KeyError" not in text and not (ws / "artifacts" / "mole").exists()
    # Experts retrained for the new clusters: the old MoLE model (other experts) is refused by evaluate.
    ws2 = _copy(reference["before"]["merge-prune"], tmp_path / "ws2")
    ok(run(ws2, "train-experts", "--set", "experts.steps=3"))
    proc = run(ws2, "evaluate", "--set", "experts.steps=3")
    assert proc.returncode == 1 and "re-run `mole train-router`" in " ".join(proc.stderr.split())


def test_an_unwritable_workspace_fails_before_any_work(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through modes; /sys refuses even root
        ws_arg = "/sys/mole-test-workspace"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        ws_arg = str(ro)
    proc = run(tmp_path, "prepare", "--set", f"workspace={ws_arg}", log=tmp_path / "calls.log")
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 1 and f"{ws_arg}: cannot write there" in text, text[-2000:]
    assert "Traceback" not in text


def test_outputs_follow_the_umask(reference: dict) -> None:
    """safetensors writes 0600 and mkdtemp 0700; every output gets the modes the umask (022 here) gives."""
    ws = reference["after"]
    files = [p for p in (ws / "artifacts").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    modes = {oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {oct(0o644)}, modes
    dirs = {oct(p.stat().st_mode & 0o777) for p in (ws / "artifacts").rglob("*") if p.is_dir()}
    assert dirs == {oct(0o755)}, dirs


def test_register_checks_the_tracking_server_before_dvc_commits_anything(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "mole.cli", "register", "--preset", "tiny",
                           "--set", f"tracking.uri=http://127.0.0.1:{port}", "--set", "tracking.retries=1"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 1 and f"http://127.0.0.1:{port} is unreachable" in text, text[-2000:]
    assert not (tmp_path / ".dvc").exists() and not (tmp_path / "dvc.lock").exists()


def test_top_k_above_the_chosen_k_is_said_not_silently_clamped(reference: dict, tmp_path: Path) -> None:
    from mole.eval.metrics import render_markdown

    ws = _copy(reference["before"]["evaluate"], tmp_path / "ws")
    k = json.loads((ws / "data" / "clusters" / "report.json").read_text())["k"]
    proc = ok(run(ws, "train-router", "--set", f"router.top_k={k + 1}"))
    assert f"router.top_k={k + 1} but only {k} experts" in " ".join(proc.stderr.split())
    metrics = json.loads((ws / "artifacts" / "mole" / "train_metrics.json").read_text())
    assert metrics["top_k"] == {"configured": k + 1, "used": k}
    report = json.loads((reference["after"] / "reports" / "eval.json").read_text())
    report["routing"]["top_k"] = metrics["top_k"]
    assert f"router.top_k is {k + 1}, but the build has {k} experts" in render_markdown(report)
