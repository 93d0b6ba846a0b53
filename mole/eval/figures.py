"""The evaluation's figures, from the workspace: which PNGs (mole.eval.plots) and CSVs (mole.eval.tables) a
report gets, and the data each is drawn from."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mole.config import BuildConfig
from mole.eval.plots import cluster_map, loss_curves, per_cluster_loss, routing_heatmap, token_routing, variant_bars
from mole.eval.tables import write_curves
from mole.io import read_jsonl
from mole.workspace import cluster_paths, experts_paths, mole_paths

logger = logging.getLogger(__name__)
EXAMPLE_TOKENS = 48  # tokens of each example row the per-token routing figure shows: the prompt's end, the completion


def write_plots(
    cfg: BuildConfig, out_dir: Path, report: dict[str, Any], expert_ids: list[str], examples: list[Any]
) -> None:
    """Every figure of an evaluation into ``out_dir`` (and the curves as CSV for DVC plots)."""
    curves: dict[str, list[float]] = {}
    index_path = experts_paths(cfg)["index"]
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else {}
    entries = [*index.get("experts", []), *([index["baseline"]] if index.get("baseline") else [])]
    for e in entries:
        metrics = cfg.path(e["path"]) / "train_metrics.json"
        if metrics.exists():
            curves[e["id"]] = json.loads(metrics.read_text(encoding="utf-8"))["loss"]
    mole_metrics = mole_paths(cfg)["metrics"]
    joint = json.loads(mole_metrics.read_text(encoding="utf-8")).get("joint") if mole_metrics.exists() else None
    loss_curves(curves, joint["loss"] if joint else None, out_dir / "loss_curves.png")
    write_curves(curves, joint["loss"] if joint else None, out_dir)
    per_cluster_loss(report["variants"], out_dir / "per_cluster_loss.png")
    variant_bars(report["variants"], out_dir / "variants.png")
    _cluster_map(cfg, out_dir / "cluster_map.png")
    routing_heatmap(report["routing"]["utilization_per_layer"], expert_ids, out_dir / "routing_heatmap.png")
    if examples:
        token_routing(examples, out_dir / "token_routing.png", max_tokens=EXAMPLE_TOKENS)


def _cluster_map(cfg: BuildConfig, path: Path) -> None:
    """The 2-D map of the training rows by cluster (and domain), from the cluster stage's projection."""
    paths = cluster_paths(cfg)
    if not paths["map"].exists():  # clusters made before the map was written: no map
        logger.info("no %s: the cluster map is drawn after the next cluster run", paths["map"])
        return
    assigned = read_jsonl(paths["assignments"])
    with np.load(paths["map"]) as m:
        points, centers = m["points"], m["centers"]
    domains = [a["domain"] for a in assigned] if all("domain" in a for a in assigned) else None
    cluster_map(points, [int(a["cluster"]) for a in assigned], path, domains=domains, centers=centers)
