"""The build's numbers as files DVC can diff and plot: ``reports/metrics.json`` (flat, one entry per variant, for
``dvc metrics diff``), ``reports/variants.csv`` (one row per variant) and ``reports/curves/<run>.csv`` (step, loss of
each training run, for ``dvc plots``). Derived from eval.json and the training metrics; full precision."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mole.io import atomic_dir, atomic_path, write_json

SCALARS = ("loss", "ppl", "exact_match")


def metrics_summary(report: dict[str, Any]) -> dict[str, Any]:
    """``{"verdict": {beats_baseline, relative_loss}, "k", "<variant>": {loss, ppl, exact_match}}`` of eval.json."""
    out: dict[str, Any] = {}
    v = report.get("verdict") or {}
    if v:
        out["verdict"] = {k: v[k] for k in ("beats_baseline", "relative_loss") if v.get(k) is not None}
    if (k := (report.get("clustering") or {}).get("k")) is not None:
        out["k"] = k
    for name, metrics in report.get("variants", {}).items():
        out[name] = {s: metrics[s] for s in SCALARS if metrics.get(s) is not None}
    return out


def write_tables(report: dict[str, Any], out_dir: Path) -> None:
    """metrics.json and variants.csv beside eval.json, each atomically."""
    write_json(out_dir / "metrics.json", metrics_summary(report))
    with atomic_path(out_dir / "variants.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["variant", *SCALARS])
        for name, metrics in report.get("variants", {}).items():
            w.writerow([name, *("" if metrics.get(s) is None else metrics[s] for s in SCALARS)])


def write_curves(curves: dict[str, list[float]], joint: list[float] | None, out_dir: Path) -> Path:
    """One ``step,loss`` CSV per training run (and ``joint.csv`` for the joint phase) in ``out_dir/curves``;
    the folder is replaced whole, so a run that no longer exists leaves no file."""
    runs = {**curves, **({"joint": joint} if joint else {})}
    with atomic_dir(out_dir / "curves") as tmp:
        for name, losses in runs.items():
            with (tmp / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["step", "loss"])
                w.writerows((i, x) for i, x in enumerate(losses, start=1))
    return out_dir / "curves"
