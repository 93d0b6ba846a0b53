"""DVC-readable report files: metrics.json, variants.csv and the per-run loss curves."""

from __future__ import annotations

import csv
from pathlib import Path

from mole.eval.tables import metrics_summary, write_curves, write_tables
from mole.io import read_json

REPORT = {
    "variants": {"base": {"loss": 2.5, "ppl": 12.18, "exact_match": None},
                 "mole": {"loss": 0.7313761234, "ppl": 2.078, "exact_match": 1 / 3, "per_cluster": {"0": 1.0}}},
    "clustering": {"k": 6},
    "verdict": {"beats_baseline": False, "relative_loss": -0.0042, "headline": "text"},
}  # fmt: skip


def test_metrics_are_flat_per_variant_and_full_precision(tmp_path: Path) -> None:
    write_tables(REPORT, tmp_path)
    m = read_json(tmp_path / "metrics.json")
    assert m == metrics_summary(REPORT)
    assert m["mole"] == {"loss": 0.7313761234, "ppl": 2.078, "exact_match": 1 / 3}
    assert m["base"] == {"loss": 2.5, "ppl": 12.18} and m["k"] == 6
    assert m["verdict"] == {"beats_baseline": False, "relative_loss": -0.0042}
    rows = list(csv.DictReader((tmp_path / "variants.csv").open(encoding="utf-8")))
    assert [r["variant"] for r in rows] == ["base", "mole"]
    assert float(rows[1]["loss"]) == 0.7313761234 and rows[0]["exact_match"] == ""


def test_curves_are_one_csv_per_run_and_replaced_whole(tmp_path: Path) -> None:
    write_curves({"expert_00": [3.0, 2.5], "stale": [1.0]}, [2.0, 1.5, 1.25], tmp_path)
    write_curves({"expert_00": [3.0, 2.5, 2.25]}, [2.0], tmp_path)
    files = sorted(p.name for p in (tmp_path / "curves").iterdir())
    assert files == ["expert_00.csv", "joint.csv"]
    rows = list(csv.DictReader((tmp_path / "curves" / "expert_00.csv").open(encoding="utf-8")))
    assert [(int(r["step"]), float(r["loss"])) for r in rows] == [(1, 3.0), (2, 2.5), (3, 2.25)]
