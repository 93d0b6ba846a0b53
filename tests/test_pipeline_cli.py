"""The CLI on the tiny preset, as a user runs it: stages in order, kill and resume, warm-start routing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MOLE = [sys.executable, "-m", "mole.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}


def mole(ws: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*MOLE, *args], cwd=ws, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"mole {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("tiny")
    mole(ws, "prepare", "--preset", "tiny")
    mole(ws, "cluster", "--preset", "tiny")
    return ws


def test_help_lists_the_commands() -> None:
    out = subprocess.run([*MOLE, "--help"], env=ENV, capture_output=True, text=True, check=True).stdout
    for cmd in ("build", "prepare", "cluster", "train-experts", "train-router", "fetch-base", "show-config"):
        assert cmd in out


def test_config_error_fails_before_any_work(tmp_path: Path) -> None:
    proc = mole(tmp_path, "prepare", "--preset", "tiny", "--set", "cluster.k=0", check=False)
    assert proc.returncode == 2
    assert "cluster.k: value 0 is invalid" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_bad_data_file_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": \n')
    proc = mole(tmp_path, "prepare", "--preset", "tiny", "--set", "data.source=d.jsonl", check=False)
    assert proc.returncode == 1 and "d.jsonl:2: malformed JSON" in proc.stderr
    assert not (tmp_path / "data" / "prepared").exists()


def test_killed_train_experts_resumes_without_retraining_finished_experts(tiny_ws: Path) -> None:
    experts = tiny_ws / "artifacts" / "experts"
    # Slow enough per expert that the kill lands mid-run, after the first expert finished; no multitask baseline
    # (it would train k × steps more). Residual experts: one run each (a cotrained run is one run for all).
    args = ["train-experts", "--preset", "tiny", "--set", "experts.steps=20", "--set", "experts.checkpoint_every=5",
            "--set", "experts.multitask_baseline=false", "--set", "experts.shared=residual"]  # fmt: skip
    proc = subprocess.Popen([*MOLE, *args], cwd=tiny_ws, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (experts / "expert_00" / "train_metrics.json").exists():
        assert proc.poll() is None, "train-experts ended before it could be killed"
        assert time.time() < deadline, "first expert never finished"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (experts / "experts.json").exists(), "the run finished before the kill"
    finished = {p.parent.name: p.stat().st_mtime_ns for p in experts.glob("expert_*/train_metrics.json")}
    assert "expert_00" in finished
    mole(tiny_ws, *args)
    index = json.loads((experts / "experts.json").read_text())
    reused = {e["id"] for e in index["experts"] if e["reused"]}
    assert set(finished) <= reused
    for name, mtime in finished.items():
        assert (experts / name / "train_metrics.json").stat().st_mtime_ns == mtime
    assert len(index["experts"]) == json.loads((tiny_ws / "data/clusters/report.json").read_text())["k"]
    assert not list(experts.glob("*.ckpt")) and not list(experts.glob(".mole-tmp-*"))


def test_warm_started_router_routes_like_the_clusterer(tiny_ws: Path) -> None:
    """Acceptance: before router training, top-1 agreement with the clusters >= 0.9 on the tiny preset's eval rows."""
    mole(tiny_ws, "train-experts", "--preset", "tiny")
    mole(tiny_ws, "train-router", "--preset", "tiny", "--set", "router.steps=0")
    metrics = json.loads((tiny_ws / "artifacts" / "mole" / "train_metrics.json").read_text())
    print(f"tiny preset: warm-start agreement {metrics['agreement']:.3f} on the eval rows, "
          f"{metrics['agreement_before_training']:.3f} on the warm start's held-out rows")  # fmt: skip
    assert metrics["agreement"] >= 0.9  # no joint steps: the eval rows' agreement is the warm start's
    assert metrics["agreement_before_training"] >= 0.9
    assert metrics["agreement_before_training_rows"] == "warm-start held-out"  # taken from that pass, not a new one
    # warm_start_method auto: both rules were scored on the held-out quarter of the warm-start rows. With no joint
    # steps the saved model carries the rule kept, so it scores those rows as recorded for that rule.
    from mole.config import load_config
    from mole.nn.model import MoLEModel
    from mole.routing.warm_start import eval_loss
    from mole.workspace import load_prepared

    ws = metrics["warm_start"]
    losses = ws["heldout_loss"]
    assert set(losses) == {"means", "logistic"} and all(0 < v < 20 for v in losses.values()), ws
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={tiny_ws}"])
    model = MoLEModel.from_pretrained(tiny_ws / "artifacts" / "mole")
    rows = load_prepared(cfg)[0][: cfg.router.warm_start_rows]
    held_out = eval_loss(model, rows[: len(rows) // 4], batch_size=cfg.router.batch_size,
                         max_length=cfg.experts.max_length)  # fmt: skip
    assert held_out == pytest.approx(losses[ws["method"]], abs=1e-4), ws  # recorded rounded to 5 decimals
    if ws["method"] == "logistic":  # the logistic fit replaces the design's nearest-mean rule only when it wins
        assert losses["logistic"] < losses["means"], ws
    util = metrics["utilization"]
    assert all(abs(sum(block) - 1) < 1e-3 for block in util)
    assert model.spec.num_experts == len(util[0])
    assert (tiny_ws / "artifacts" / "mole" / "clusterer" / "centroids.npy").exists()
    # merge-prune's all-token utilization of the eval rows, recorded from the same pass: what its own pass measures
    from mole.merge import utilization

    evals = load_prepared(cfg)[1]
    # train-router's batches (merge-prune's own pass uses evaluate's: the same means up to padding's float noise)
    kw = {"batch_size": cfg.router.batch_size, "max_length": cfg.experts.max_length}
    recorded = utilization(model, evals, **kw, recorded=tiny_ws / "artifacts" / "mole" / "train_metrics.json")
    assert metrics["utilization_all_tokens"]["expert_ids"] == model.spec.expert_ids
    assert recorded == pytest.approx(utilization(model, evals, **kw), abs=1e-5)


def test_cli_errors_keep_bracketed_locators(tmp_path: Path) -> None:
    """The row locator ``file.json[item 3]`` reaches the terminal whole: errors print with rich markup off."""
    bad = tmp_path / "arr_bad.json"
    bad.write_text(json.dumps([{"text": f"row {i}"} for i in range(3)] + ["not an object"]))
    proc = subprocess.run([sys.executable, "-m", "mole.cli", "prepare", "--set", f"data.source={bad}"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "arr_bad.json[item 3]: expected a JSON object" in " ".join(proc.stderr.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--max-new-tokens", "0", "--prompt", "hi"], "--max-new-tokens: 0 is not a positive number"),
     (["--temperature", "-1", "--prompt", "hi"], "--temperature: -1.0 is negative"),
     (["--prompt", "  "], "--prompt #1: the prompt is empty")],
)  # fmt: skip
def test_predict_refuses_bad_parameters_before_loading_a_model(tmp_path: Path, args: list[str], message: str) -> None:
    # The model dir does not exist: a check made after loading would fail on it instead.
    proc = subprocess.run([sys.executable, "-m", "mole.cli", "predict", "--model", str(tmp_path / "nowhere"), *args],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split())


def test_version_and_preset_choices() -> None:
    from importlib.metadata import version

    out = subprocess.run([*MOLE, "--version"], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"mole {version('mole')}"
    bad = subprocess.run([*MOLE, "show-config", "--preset", "nope"], env=ENV, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "'demo', 'tiny'" in " ".join(bad.stderr.split())
