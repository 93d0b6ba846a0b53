"""``mole diff`` on model directories (no tracking server): the table, the JSON, and errors that name the side.

The registry side (``models:/…``) is tested against a real MLflow server in tests/flows/test_lineage_registry.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mole.base import load_base
from mole.cli import app
from mole.nn.lineage import model_experts
from mole.nn.model import MoLEModel
from mole.nn.spec import MoLESpec
from tests.nn.test_lineage import lineage_model

ENV = {"COLUMNS": "220", "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """OLD: experts 00, 01, 02 + shared. NEW: 00 and shared as they were, 01 fine-tuned from OLD's (its weights
    doubled, 20 rows, 3 steps), 02 gone, 03 new."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("diff")
    old = lineage_model()
    old_dir = old.save_pretrained(root / "old")
    old = MoLEModel.from_pretrained(old_dir)
    spec = MoLESpec(**{**old.spec.__dict__, "expert_ids": ["expert_00", "expert_01", "expert_03"]})
    new = MoLEModel(base=load_base("tiny", seed=0)[0], tokenizer=old.tokenizer, spec=spec)
    with torch.no_grad():
        for name, layer in new.bank.items():
            src = old.bank[name]
            layer.set_expert(0, *src.expert(0))
            a, b = src.expert(1)
            layer.set_expert(1, a, 2 * b)
            layer.set_expert(2, torch.randn_like(a), torch.randn_like(b))
            layer.set_expert(new.shared_index, *src.expert(old.shared_index))
    lin = old.lineage
    new.lineage = {"expert_00": lin["expert_00"], "shared": lin["shared"],
                   "expert_01": {"id": "expert_01", "rows": 20, "steps": 3, "joint_steps": 0,
                                 "parents": [{"id": "expert_01", "sha256": lin["expert_01"]["sha256"]}]},
                   "expert_03": {"id": "expert_03", "rows": 7, "steps": 6}}  # fmt: skip
    return old_dir, new.save_pretrained(root / "new")


def _diff(*args: str) -> object:
    return CliRunner().invoke(app, ["diff", *args], env=ENV, terminal_width=220)


def test_diff_of_two_model_dirs_prints_each_expert_with_its_status(two: tuple[Path, Path]) -> None:
    res = _diff(*map(str, two))
    assert res.exit_code == 0, res.output
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in res.stdout.splitlines() if line.count("│") > 6}  # fmt: skip
    old, new = (model_experts(d) for d in two)
    short = {k: {e: r["sha256"][:12] for e, r in side.items()} for k, side in (("old", old), ("new", new))}
    assert lines["expert_00"] == ["unchanged", short["old"]["expert_00"], short["new"]["expert_00"], "10",
                                  "6 + 2 joint", ""]  # fmt: skip
    assert lines["expert_01"] == ["changed", short["old"]["expert_01"], short["new"]["expert_01"], "11 → 20",
                                  "6 + 2 joint → 3", "fine-tuned from the old weights"]  # fmt: skip
    assert lines["expert_03"] == ["added", "—", short["new"]["expert_03"], "7", "6", ""]
    assert lines["expert_02"] == ["removed", short["old"]["expert_02"], "—", "12", "6 + 2 joint", ""]
    assert lines["shared"][0] == "unchanged"
    assert list(lines) == ["expert_00", "expert_01", "expert_03", "shared", "expert_02"]
    assert "1 changed, 1 added, 1 removed, 2 unchanged" in res.stdout


def test_diff_json_keeps_full_hashes_and_every_known_field(two: tuple[Path, Path]) -> None:
    res = _diff(*map(str, two), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["counts"] == {"changed": 1, "added": 1, "removed": 1, "unchanged": 2}
    assert doc["old"] == {"ref": str(two[0]), "label": str(two[0])}
    rows = {r["id"]: r for r in doc["experts"]}
    old, new = (model_experts(d) for d in two)
    assert rows["expert_01"]["old"]["sha256"] == old["expert_01"]["sha256"] and len(old["expert_01"]["sha256"]) == 64
    parents = [{"id": "expert_01", "sha256": old["expert_01"]["sha256"]}]
    assert rows["expert_01"]["new"] == {"sha256": new["expert_01"]["sha256"], "kind": "expert", "rows": 20, "steps": 3,
                                        "joint_steps": 0, "parents": parents}  # fmt: skip
    assert rows["expert_00"]["old"]["made_by"] == "train-router" and rows["expert_02"]["new"] is None


def test_an_mlflow_model_dir_is_diffed_through_the_mole_model_inside_it(two: tuple[Path, Path], tmp_path: Path) -> None:
    downloaded = tmp_path / "model"  # what `mlflow artifacts download -u models:/m/1` gives
    shutil.copytree(two[1], downloaded / "artifacts" / "mole")
    (downloaded / "MLmodel").write_text("flavors: {}\n")
    doc = json.loads(_diff(str(two[1]), str(downloaded), "--json").stdout)
    assert doc["counts"]["unchanged"] == 4 and doc["new"]["label"] == str(downloaded / "artifacts" / "mole")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{old}", "{tmp}/missing"], "NEW {tmp}/missing: no such directory"),
        (["{tmp}", "{old}"], "OLD {tmp}: no mole_config.json; not a MoLE model directory"),
        (["runs:/abc/model", "{old}"], "OLD 'runs:/abc/model': expected models:/<name>/<version>"),
        (["{old}", "models:/mole/three"], "NEW 'models:/mole/three': expected models:/<name>/<version number>"),
        (
            ["{old}", "models:/mole/3", "--set", "tracking.uri=sqlite:///{tmp}/none.db"],
            "NEW models:/mole/3: no tracking store at sqlite:///{tmp}/none.db (no such file)",
        ),
    ],
)
def test_a_side_that_is_not_there_is_named(two: tuple[Path, Path], tmp_path: Path, args: list, message: str) -> None:
    fill = {"old": two[0], "tmp": tmp_path}
    res = _diff(*(a.format(**fill) for a in args))
    assert res.exit_code == 2, res.output
    assert message.format(**fill) in " ".join(res.stderr.split())
    assert not (tmp_path / "none.db").exists()  # a read-only command creates no tracking store
