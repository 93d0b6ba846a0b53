"""The workspace: every stage's output paths and file names, the loaders of those outputs, and its upkeep.

Stages (:mod:`mole.stages`) are the only code that writes here; any layer may ask where an output lives or load
one through this module, so no path is spelled twice.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from mole.config import BuildConfig
from mole.io import read_jsonl, recover, write_json

logger = logging.getLogger(__name__)

SPEC_FILE = "mole_config.json"  # a MoLE model dir's spec; its other files are named in mole.nn.model
STAGE_TIMES = ".mole/stage_times.json"  # workspace-relative: each stage's wall time in its latest run
UTILIZATION_FILE = "utilization.json"  # in a model dir: each expert's utilization in this build and those before
PREVIOUS = "artifacts/previous"  # workspace-relative: the previous build's model an incremental build starts from
GALLERY = "artifacts/gallery"  # workspace-relative: imported peft adapters (mole add-expert), one dir per name


def output_dirs(cfg: BuildConfig) -> list[Path]:
    """Every stage's output directory (and where their atomic temps live: the directories and their parents)."""
    dirs = [cfg.data.out_dir, cfg.cluster.out_dir, cfg.experts.out_dir, cfg.experts.baseline_dir, cfg.router.out_dir,
            cfg.evaluate.out_dir, cfg.merge.keep_dir]  # fmt: skip
    return [cfg.path(d) for d in dirs]


def recover_workspace(cfg: BuildConfig) -> None:
    """Before a stage: put back outputs a killed write left missing and remove unfinished temps (``mole.io.recover``).

    It also puts back the MoLE model if merge-prune was killed between its two renames (the unmerged one: the
    stage then runs again).
    """
    mole_dir, keep = cfg.path(cfg.router.out_dir), cfg.path(cfg.merge.keep_dir)
    if not mole_dir.exists() and (keep / SPEC_FILE).exists():
        keep.rename(mole_dir)
        logger.warning("restored %s from %s (merge-prune was interrupted)", mole_dir, keep)
    roots = {p for d in output_dirs(cfg) for p in (d, d.parent)} | {cfg.path(STAGE_TIMES).parent}
    for line in recover(roots):
        logger.warning("%s", line)


def check_writable(cfg: BuildConfig) -> None:
    """Fail before any work when the workspace or an output dir (or, not made yet, its nearest parent) is not writable.

    Raises:
        PermissionError: naming the directory and the OS's reason.
    """
    probed: set[Path] = set()
    for target in [cfg.path("."), *output_dirs(cfg)]:
        d = target
        while not d.exists() and d.parent != d:  # a dir made later: its nearest existing ancestor must take it
            d = d.parent
        if d in probed:
            continue
        probed.add(d)
        try:
            fd, probe = tempfile.mkstemp(prefix=".mole-tmp-probe.", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            where = "" if d == target else f" in {d}"
            raise PermissionError(
                f"{target}: cannot write there ({exc.strerror or exc}{where}); make it writable or choose another "
                "workspace (--set workspace=DIR)"
            ) from None
    cfg.path(".").mkdir(parents=True, exist_ok=True)


def stage_times(cfg: BuildConfig) -> dict[str, float]:
    """Stage name -> wall seconds of its latest run in this workspace (``{}`` before any)."""
    path = cfg.path(STAGE_TIMES)
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_stage_time(cfg: BuildConfig, stage: str, seconds: float) -> None:
    """Remember ``stage``'s wall time (kept out of the stages' outputs, so their content hashes stay stable)."""
    write_json(cfg.path(STAGE_TIMES), {**stage_times(cfg), stage: round(seconds, 3)})


def prepared_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``prepare`` writes its outputs."""
    out = cfg.path(cfg.data.out_dir)
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "stats": out / "stats.json"}


def cluster_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``cluster`` writes its outputs."""
    out = cfg.path(cfg.cluster.out_dir)
    return {
        "dir": out,
        "assignments": out / "assignments.jsonl",
        "eval_assignments": out / "eval_assignments.jsonl",
        "centroids": out / "centroids.npy",
        "report": out / "report.json",
        "map": out / "map_2d.npz",  # the rows and centroids on their first two principal components
        "plan": out / "incremental.json",  # full or incremental, why, and each cluster's change since the previous
    }


def load_prepared(cfg: BuildConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prepared (train, eval) rows; a clear error when `mole prepare` has not run."""
    paths = prepared_paths(cfg)
    for key in ("train", "eval"):
        if not paths[key].exists():
            raise FileNotFoundError(f"{paths[key]} does not exist; run `mole prepare` first")
    return read_jsonl(paths["train"]), read_jsonl(paths["eval"])


def experts_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``train-experts`` writes its outputs."""
    out = cfg.path(cfg.experts.out_dir)
    return {"dir": out, "index": out / "experts.json", "baseline": cfg.path(cfg.experts.baseline_dir)}


def mole_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``train-router`` writes the MoLE model."""
    out = cfg.path(cfg.router.out_dir)
    return {"dir": out, "config": out / SPEC_FILE, "metrics": out / "train_metrics.json"}


def eval_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``evaluate`` writes its report (merge-prune adds its variant to the same eval.json)."""
    out = cfg.path(cfg.evaluate.out_dir)
    return {"dir": out, "eval": out / "eval.json", "markdown": out / "eval.md", "card": out / "model_card.md",
            "merge_prune": out / "merge_prune.json", "rows": out / "eval_rows.jsonl",
            "lifecycle": out / "lifecycle.json"}  # fmt: skip
