"""dvc.yaml and flows/versioning.py: the pipeline's shape, record/push/pull of a build, and `dvc repro`.

A git workspace is built once per module by calling the stages (as the Prefect flow does); record_outputs
commits and pushes it to the default local remote, and a fresh `git clone` pulls it back. The `dvc repro` run
(six `mole` commands on a params.yaml from `mole show-config --preset tiny`) is marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows import versioning
from mole import stages
from mole.config import BuildConfig, load_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ["prepare", "cluster", "train-experts", "train-router", "evaluate", "merge-prune"]
OVERRIDES = [
    "cluster.embedder=tfidf",
    "cluster.k=3",
    "data.demo_rows_per_skill=12",
    "experts.steps=3",
    "router.steps=2",
    "evaluate.generate_rows=6",
    "evaluate.max_new_tokens=6",
    "evaluate.latency_reps=1",
]
TINY = ["--preset", "tiny", *(arg for o in OVERRIDES for arg in ("--set", o))]
ENV = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1", "COLUMNS": "200"}


def run(cwd: Path, *cmd: str, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", "-c", "user.name=mole-test", "-c", "user.email=mole@test", *args)


def md5s(root: Path, *dirs: str) -> dict[str, str]:
    """{relative path: md5} of every file under ``dirs`` of ``root``."""
    return {
        str(f.relative_to(root)): hashlib.md5(f.read_bytes()).hexdigest()
        for d in dirs
        for f in sorted((root / d).rglob("*"))
        if f.is_file()
    }


def _lookup(tree: dict, dotted: str) -> object:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# ------------------------------------------------------------------------------------------ the pipeline file
def _pipeline() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _outs(stage: dict) -> list[tuple[str, dict]]:
    items = [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]
    return [(next(iter(o)), next(iter(o.values()))) if isinstance(o, dict) else (o, {}) for o in items]


def test_pipeline_stages_commands_code_and_params() -> None:
    pipeline = _pipeline()
    assert list(pipeline) == STAGES
    fields = BuildConfig().model_dump()
    for name, stage in pipeline.items():
        assert stage["cmd"] == f"mole {name}"
        code = [d for d in stage["deps"] if d.startswith("mole/")]
        assert code and all((REPO / d).exists() for d in code), f"{name}: missing code deps"
        for key in stage["params"]:
            node = fields
            for part in key.split("."):
                assert part in node, f"{name}: params key {key} is not in params.yaml"
                node = node[part]


def test_pipeline_outs_have_one_owner_and_in_place_outs_persist() -> None:
    """merge-prune rewrites artifacts/mole and eval.json: each path has one owner, and merge-prune's persist."""
    params = BuildConfig().model_dump()

    def real(path: str) -> str:  # ${a.b} -> params.yaml's value, as DVC interpolates it
        return re.sub(r"\$\{([\w.]+)\}", lambda m: str(_lookup(params, m.group(1))), path)

    owned = [(real(p), name, opts) for name, s in _pipeline().items() for p, opts in _outs(s)]
    paths = [p for p, _, _ in owned]
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            assert a != b and not a.startswith(b + "/") and not b.startswith(a + "/"), (a, b)
    for path, name, opts in owned:
        if name == "merge-prune" and path != "reports/merge_prune.json":
            assert opts.get("persist") is True, path
    assert {p for p, n, _ in owned if n == "merge-prune"} >= {"artifacts/mole/router.safetensors", "reports/eval.json"}


def test_workspace_outside_git_is_a_no_scm_repo_with_the_pipeline(tmp_path: Path) -> None:
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={tmp_path}"])
    ws = versioning.ensure_repo(cfg)
    assert "no_scm = True" in (ws / ".dvc" / "config").read_text()
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES
    code = [d for s in stages.values() for d in s["deps"] if "mole/" in d]
    assert code and all(Path(d).is_absolute() and Path(d).exists() for d in code)  # no mole/ in the workspace
    assert load_config(ws / "params.yaml").model_dump() == cfg.model_copy(update={"workspace": "."}).model_dump()
    remote = str(ws / ".dvc" / "remote-storage")
    assert versioning._remote_url(ws) == remote
    versioning.ensure_repo(cfg)  # idempotent
    assert (ws / ".dvcignore").read_text().count(".mole-tmp-*") == 1


def test_remote_from_the_environment_when_config_has_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers of the infra stack name the remote with MOLE_DVC_REMOTE; an explicit dvc.remote still wins."""
    env_remote, cfg_remote = tmp_path / "env-remote", tmp_path / "cfg-remote"
    monkeypatch.setenv("MOLE_DVC_REMOTE", str(env_remote))
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={tmp_path / 'ws'}"])
    assert versioning._remote_url(versioning.ensure_repo(cfg)) == str(env_remote)
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={tmp_path / 'ws'}", f"dvc.remote={cfg_remote}"])
    assert versioning._remote_url(versioning.ensure_repo(cfg)) == str(cfg_remote)


# ----------------------------------------------------------- a Prefect-style build: record, push, pull
@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A git workspace built by calling the stages (as the Prefect flow does), then record_outputs."""
    ws = tmp_path_factory.mktemp("dvc_build")
    git(ws, "init", "-q")
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={ws}", *OVERRIDES])
    for stage in (stages.prepare, stages.cluster, stages.train_experts, stages.train_router, stages.evaluate):
        stage(cfg)
    stages.merge_prune(cfg)
    t0 = time.perf_counter()
    res = versioning.record_outputs(cfg)
    print(f"record_outputs (init, commit, push): {time.perf_counter() - t0:.1f}s")
    return {"ws": ws, "cfg": cfg, "res": res}


def test_record_outputs_commits_every_stage_and_pushes(recorded: dict) -> None:
    ws, res = recorded["ws"], recorded["res"]
    assert res["pushed"] and res["remote"] == str(ws / ".dvc" / "remote-storage")
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert list(lock) == STAGES
    assert res["hashes"]["data/prepared"] == lock["prepare"]["outs"][0]["md5"]
    assert res["hashes"]["artifacts/experts"].endswith(".dir")
    assert set(res["hashes"]) >= {"data/prepared", "artifacts/experts", "artifacts/mole/router.safetensors"}
    assert (ws / ".dvc" / "remote-storage" / "files" / "md5").is_dir()
    assert "up to date" in run(ws, sys.executable, "-m", "dvc", "status")
    assert "/remote-storage" in (ws / ".dvc" / ".gitignore").read_text().split()


def test_push_then_pull_in_a_fresh_clone_restores_identical_files(recorded: dict, tmp_path: Path) -> None:
    ws = recorded["ws"]
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "tiny build")
    tracked = git(ws, "ls-files").split()
    assert {"dvc.yaml", "dvc.lock", "params.yaml", ".dvc/config"} <= set(tracked)
    data = ("data/prepared/", "data/clusters/", "artifacts/", "reports/", ".dvc/remote-storage", ".dvc/cache")
    assert not [f for f in tracked if f.startswith(data) and not f.endswith(".gitignore")]
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ws), str(clone))
    assert not (clone / "data" / "prepared").exists()
    run(clone, sys.executable, "-m", "dvc", "pull")
    dirs = ("data/prepared", "data/clusters", "artifacts/experts", "artifacts/mole", "reports")
    original, pulled = md5s(ws, *dirs), md5s(clone, *dirs)
    assert pulled == original and "artifacts/mole/router.safetensors" in pulled
    assert "up to date" in run(clone, sys.executable, "-m", "dvc", "status")


def test_failed_push_names_the_command(recorded: dict) -> None:
    ws, cfg = recorded["ws"], recorded["cfg"]
    broken = cfg.model_copy(update={"dvc": cfg.dvc.model_copy(update={"remote": "s3://mole-test/none"})})
    try:
        with pytest.raises(RuntimeError, match="`dvc push` failed in"):
            versioning.record_outputs(broken)
    finally:  # back to the local default remote
        versioning.dvc(ws, "remote", "add", "--force", "--default", "mole", str(ws / ".dvc" / "remote-storage"))


@pytest.mark.slow  # a whole tiny build: in make test-slow, keeping make test under 10 minutes
def test_build_without_multitask_baseline_is_recorded(tmp_path: Path) -> None:
    """experts.multitask_baseline=false: the baseline out holds only NOT_TRAINED.json (an adapter an earlier build
    left there is gone, so evaluate reports no stale baseline), and `dvc commit` finds every out."""
    ws = tmp_path / "ws"
    overrides = [f"workspace={ws}", *OVERRIDES, "experts.multitask_baseline=false"]
    cfg = load_config(None, preset="tiny", overrides=overrides)
    stale = cfg.path(cfg.experts.baseline_dir)
    stale.mkdir(parents=True)
    (stale / "adapter_config.json").write_text("{}")  # as an earlier build with the baseline would have left it
    for stage in (stages.prepare, stages.cluster, stages.train_experts, stages.train_router, stages.evaluate):
        stage(cfg)
    stages.merge_prune(cfg)
    assert [p.name for p in stale.iterdir()] == ["NOT_TRAINED.json"]
    report = yaml.safe_load((ws / "reports" / "eval.json").read_text())
    assert "multitask_lora" not in report["variants"] and "mole" in report["variants"]
    res = versioning.record_outputs(cfg)
    assert res["hashes"][cfg.experts.baseline_dir].endswith(".dir")
    assert "up to date" in run(ws, sys.executable, "-m", "dvc", "status")


# ---------------------------------------------------------------------------------------- dvc repro
@pytest.mark.slow
def test_dvc_repro_runs_every_stage_and_then_nothing(tmp_path: Path) -> None:
    """`dvc repro` on a tiny params.yaml runs the six stages; a second repro runs none (in-place merge-prune)."""
    ws = tmp_path
    (ws / "params.yaml").write_text(run(ws, str(BIN / "mole"), "show-config", *TINY))
    versioning.ensure_repo(load_config(ws / "params.yaml").model_copy(update={"workspace": str(ws)}))
    t0 = time.perf_counter()
    log = run(ws, sys.executable, "-m", "dvc", "repro")
    print(f"dvc repro (6 stages, tiny): {time.perf_counter() - t0:.1f}s")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log, stage
    assert list(yaml.safe_load((ws / "dvc.lock").read_text())["stages"]) == STAGES
    for rel in ("data/prepared/train.jsonl", "data/clusters/report.json", "artifacts/experts/experts.json",
                "artifacts/mole/mole_config.json", "reports/eval.json", "reports/merge_prune.json"):  # fmt: skip
        assert (ws / rel).exists(), rel
    assert "up to date" in run(ws, sys.executable, "-m", "dvc", "status")
    # metrics and plots in forms DVC reads: a flat metrics file and CSV plot data
    flat = run(ws, sys.executable, "-m", "dvc", "metrics", "show", "--json")
    report = json.loads((ws / "reports/eval.json").read_text())
    metrics = json.loads((ws / "reports/metrics.json").read_text())
    assert metrics["mole"]["loss"] == report["variants"]["mole"]["loss"] and metrics["k"] == report["clustering"]["k"]
    assert "reports/eval.json" not in flat, "eval.json is an out: dvc metrics shows the flat metrics.json"
    assert "reports/metrics.json" in flat and str(report["variants"]["mole"]["loss"])[:6] in flat
    plots = run(ws, sys.executable, "-m", "dvc", "plots", "show", "--json")
    assert "reports/variants.csv" in plots and "reports/curves/joint.csv" in plots
    again = run(ws, sys.executable, "-m", "dvc", "repro")
    assert "Running stage" not in again, "a second repro must not re-run anything (merge-prune rewrites in place)"
