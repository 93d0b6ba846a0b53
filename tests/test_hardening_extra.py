"""Issue 14 items the fault matrix and the data/CLI tests leave open, on in-memory configs and tiny workspaces.

Each test fails on 970293f: a boolean cluster count, train-router over clusters of other prepared rows, the
writability check ahead of every stage's inputs, modes under any umask (not only 022), and the repair of every
atomic output a killed swap left missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mole import stages, workspace
from mole.config import ConfigError, load_config
from mole.io import TMP_PREFIX, atomic_dir, write_json

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
WORDS = ["apple pie oven sugar", "train rail station ticket", "piano violin chord melody", "goal match referee"]


def _rows(tag: str, n: int = 40) -> list[dict[str, str]]:
    return [{"prompt": f"{WORDS[i % 4]} {tag} {i}?\nAnswer:", "completion": f"{tag}{i}"} for i in range(n)]


def _source(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- item 9: config consistency
@pytest.mark.parametrize("value", ["true", "false"])
def test_a_boolean_is_not_a_cluster_count(tmp_path: Path, value: str) -> None:
    """YAML's true is an int subclass in Python: it must not become k = 1 (or 0), from --set or from params.yaml."""
    with pytest.raises(ConfigError, match=rf"k: expected an integer, got {value}"):
        load_config(None, preset="tiny", overrides=[f"cluster.k={value}"])
    params = tmp_path / "params.yaml"
    params.write_text(f"cluster:\n  k: {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"k: expected an integer, got {value}"):
        load_config(params)


@pytest.mark.parametrize("key", ["router.top_k", "experts.steps", "experts.multitask_steps", "seed"])
def test_a_boolean_is_not_any_count(key: str) -> None:
    """Every integer setting refuses true/false, naming the field."""
    name = key.rsplit(".", 1)[-1]
    with pytest.raises(ConfigError, match=rf"{name}: expected an integer, got true"):
        load_config(None, preset="tiny", overrides=[f"{key}=true"])


# --------------------------------------------------------- item 3: train-router checks its clusters are current
def test_train_router_refuses_clusters_of_other_prepared_rows(workspace: Path) -> None:
    """prepare re-run on other rows after cluster and train-experts: train-router names `mole cluster`, no KeyError."""
    src = _source(workspace / "d.jsonl", _rows("a"))
    over = [f"data.source={src}", "cluster.embedder=tfidf", "cluster.k=2", "cluster.min_cluster_size=4",
            "experts.steps=1", "experts.shared=none", "experts.multitask_baseline=false"]  # fmt: skip
    cfg = load_config(None, preset="tiny", overrides=over)
    stages.prepare(cfg)
    stages.cluster(cfg)
    stages.train_experts(cfg)
    _source(src, _rows("b"))  # other rows, other ids
    stages.prepare(cfg)
    with pytest.raises(ValueError, match=r"assignments\.jsonl: .*re-run `mole cluster`"):
        stages.train_router(cfg)
    assert not (workspace / "artifacts" / "mole").exists()


# ------------------------------------------------------------------------- item 7: unwritable workspace, first
def _unwritable(tmp_path: Path) -> str:
    if os.geteuid() == 0:  # root writes through modes; /sys refuses even root
        return "/sys/mole-test-workspace"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro)


@pytest.mark.parametrize("stage", ["prepare", "cluster", "train_experts", "train_router", "evaluate", "merge_prune"])
def test_every_stage_checks_the_workspace_before_it_reads_its_inputs(tmp_path: Path, stage: str) -> None:
    """No inputs exist either: a stage that looked at them first would fail on them, not on the workspace."""
    ws = _unwritable(tmp_path)
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={ws}", f"data.source={tmp_path / 'none.jsonl'}"])
    with pytest.raises(PermissionError, match=rf"{ws}: cannot write there .*--set workspace=DIR"):
        getattr(stages, stage)(cfg)


@pytest.mark.parametrize("stage", ["train-experts", "train-router"])
def test_an_os_error_in_a_training_stage_is_one_line_naming_the_path(tmp_path: Path, stage: str) -> None:
    (tmp_path / "data" / "prepared" / "train.jsonl").mkdir(parents=True)  # an input that cannot be read as a file
    (tmp_path / "data" / "prepared" / "eval.jsonl").write_text("")
    (tmp_path / "data" / "clusters").mkdir(parents=True)
    (tmp_path / "data" / "clusters" / "assignments.jsonl").write_text("")
    proc = subprocess.run([sys.executable, "-m", "mole.cli", stage, "--preset", "tiny"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 1 and "data/prepared/train.jsonl: Is a directory" in text, text[-2000:]
    assert "Traceback" not in text


# ------------------------------------------------------------------------------------ item 11: outputs, umask
@pytest.mark.parametrize("mask", [0o027, 0o002])
def test_atomic_outputs_take_the_modes_of_any_umask(tmp_path: Path, mask: int) -> None:
    """Not a fixed 0644: a group-private umask keeps others out, a group-writable one lets the group write."""
    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "experts" / "expert_00").mkdir(parents=True)
            save_file({"w": torch.zeros(2)}, str(tmp / "experts" / "expert_00" / "adapter_model.safetensors"))
            save_file({"w": torch.zeros(2)}, str(tmp / "router.safetensors"))
        write_json(tmp_path / "eval.json", {"loss": 1.0})
    finally:
        os.umask(old)
    root = tmp_path / "model"
    files = [p for p in root.rglob("*") if p.is_file()] + [tmp_path / "eval.json"]
    dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
    assert len(files) == 3 and len(dirs) == 3
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {oct(0o777 & ~mask)}


# ----------------------------------------------------------------- item 12: a swap killed between its renames
def test_the_next_stage_puts_back_every_atomic_output_a_killed_swap_left_missing(tmp_path: Path) -> None:
    """Every output dir as a kill between atomic_dir's renames leaves it: missing, its previous version aside as
    ``.mole-tmp-<name>.old``, and beside it an unfinished temp. Any stage's start restores all and removes the rest."""
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={tmp_path}"])
    targets = workspace.output_dirs(cfg)
    for target in targets:
        old = target.with_name(f"{TMP_PREFIX}{target.name}.old")
        old.mkdir(parents=True)
        (old / "marker").write_text(target.name)
        (target.with_name(f"{TMP_PREFIX}{target.name}.k3j2") / "half").mkdir(parents=True)
    (tmp_path / ".mole").mkdir()
    (tmp_path / ".mole" / f"{TMP_PREFIX}stage_times.json.x81f").write_text("{")  # a file write cut short
    stages.begin(cfg)
    for target in targets:
        assert (target / "marker").read_text() == target.name, target
    assert list(tmp_path.rglob(f"{TMP_PREFIX}*")) == []


def test_an_output_dir_not_made_yet_is_checked_through_its_unwritable_parent(tmp_path: Path) -> None:
    """The workspace is writable but artifacts/ is not: train-experts would fail only when it writes experts/."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "artifacts").symlink_to("/sys")  # a directory nobody (not even root) can create files in
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={ws}"])
    with pytest.raises(PermissionError, match=r"artifacts/experts: cannot write there .* in .*/artifacts\)"):
        stages.check_writable(cfg)
