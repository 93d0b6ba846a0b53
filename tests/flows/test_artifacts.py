"""flows.artifacts: how summary values read in the Prefect UI, and where the reports are (no Prefect server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.artifacts import report_paths, shown
from mole.config import BuildConfig


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3.14159265, "3.142"),  # floats: 4 significant digits
        (0.000123456, "0.0001235"),
        (123456.789, "1.235e+05"),
        (2.0, "2"),
        (42, "42"),  # ints as they are
        (1234567, "1234567"),
        (True, "`True`"),  # a bool is not a number here
        (None, "`None`"),
        ("artifacts/mole", "`artifacts/mole`"),
        (["a", "b"], "`['a', 'b']`"),
        ({"prepare": 1.234, "train-experts": 30, "note": "reused"}, "prepare 1.2 s, train-experts 30.0 s, note reused"),
        ({}, ""),
    ],
)
def test_shown(value: object, text: str) -> None:
    assert shown(value) == text


def test_report_paths_are_where_the_stages_write() -> None:
    assert report_paths(BuildConfig(workspace="/ws")) == {
        "eval_json": str(Path("/ws/reports/eval.json")),
        "eval_md": str(Path("/ws/reports/eval.md")),
        "merge": str(Path("/ws/reports/merge_prune.json")),
    }
    moved = BuildConfig(workspace="ws", evaluate={"out_dir": "out/r"})
    assert report_paths(moved)["eval_md"] == str(Path("ws/out/r/eval.md"))
