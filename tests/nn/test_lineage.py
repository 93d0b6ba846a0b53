"""Expert lineage: content hashes of adapter dirs, lineage.json through save/load and merge, and the comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mole.base import load_base
from mole.merge import apply_plan, plan
from mole.nn.adapters import CONFIG, WEIGHTS, read_adapter, write_adapter
from mole.nn.lineage import LINEAGE, adapter_digest, brief, compare, model_experts
from mole.nn.model import MoLEModel
from mole.nn.spec import MoLESpec
from mole.sections import MergeConfig

MODULE = "model.layers.0.self_attn.q_proj"


def _adapter(directory: Path, scale: float = 1.0) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {MODULE: (torch.randn(4, 16, generator=g), scale * torch.randn(16, 4, generator=g))}
    return write_adapter(directory, tensors, r=4, lora_alpha=8.0, target_modules=["q_proj"], base_model="tiny")


def test_the_digest_is_the_adapters_content_not_its_file_layout(tmp_path: Path) -> None:
    one = _adapter(tmp_path / "one")
    two = tmp_path / "two"
    two.mkdir()
    tensors = load_file(str(one / WEIGHTS))
    # Other safetensors metadata, and an adapter_config.json written by another peft version, with keys reordered.
    save_file(tensors, str(two / WEIGHTS), metadata={"format": "pt", "saved_by": "someone else"})
    config = json.loads((one / CONFIG).read_text()) | {"peft_version": "0.99.0"}
    (two / CONFIG).write_text(json.dumps(dict(reversed(list(config.items())))))
    assert (one / WEIGHTS).read_bytes() != (two / WEIGHTS).read_bytes()
    assert adapter_digest(one) == adapter_digest(two) and len(adapter_digest(one)) == 64

    key = next(iter(tensors))
    changed = {**tensors, key: tensors[key].clone()}
    changed[key][0, 0] += 1e-6  # one weight, one ulp-ish step
    save_file(changed, str(two / WEIGHTS), metadata={"format": "pt"})
    assert adapter_digest(two) != adapter_digest(one)
    shutil.copy(one / WEIGHTS, two / WEIGHTS)
    (two / CONFIG).write_text(json.dumps(config | {"lora_alpha": 16.0}))  # same weights, twice the scale
    assert adapter_digest(two) != adapter_digest(one)


def test_a_damaged_or_incomplete_adapter_is_named(tmp_path: Path) -> None:
    d = _adapter(tmp_path / "a")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{d / WEIGHTS}: shorter than its header says"):
        adapter_digest(d)
    (d / WEIGHTS).write_bytes(b"\x01")
    with pytest.raises(ValueError, match="not a safetensors file"):
        adapter_digest(d)
    (d / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"{d}: not a peft adapter dir \\(missing {WEIGHTS}\\)"):
        adapter_digest(d)


def lineage_model(num_experts: int = 3, shared: str | None = "shared") -> MoLEModel:
    """A tiny MoLE model with random experts, each with a lineage record (rows 10, 11, ...; 6 + 2 joint steps)."""
    base, tok = load_base("tiny", seed=0)
    ids = [f"expert_{i:02d}" for i in range(num_experts)]
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=ids, r=4, lora_alpha=8.0, top_k=2,
                    target_modules=["q_proj", "v_proj"], clusters=list(range(num_experts)), shared=shared)  # fmt: skip
    model = MoLEModel(base=base, tokenizer=tok, spec=spec)
    with torch.no_grad():
        for layer in model.bank.values():
            layer.lora_B.normal_(std=0.5)
    parents = {eid: [{"id": eid, "sha256": f"{i:064x}", "path": f"artifacts/experts/{eid}"}]
               for i, eid in enumerate([*ids, shared])}  # fmt: skip
    model.lineage = {eid: {"id": eid, "kind": "shared" if eid == shared else "expert", "rows": 10 + i, "steps": 6,
                           "joint_steps": 2, "made_by": {"stage": "train-router"}, "parents": parents[eid]}
                     for i, eid in enumerate([*ids, shared]) if eid}  # fmt: skip
    return model.eval()


def test_lineage_is_saved_with_the_hash_of_the_written_expert_and_survives_a_round_trip(tmp_path: Path) -> None:
    model = lineage_model()
    first = model.save_pretrained(tmp_path / "m1")
    for eid in [*model.spec.expert_ids, "shared"]:
        record = json.loads((first / "experts" / eid / LINEAGE).read_text())
        assert record["sha256"] == adapter_digest(first / "experts" / eid)
        assert record["rows"] == model.lineage[eid]["rows"] and record["parents"] == model.lineage[eid]["parents"]
        read_adapter(first / "experts" / eid)  # still a plain peft adapter dir
    again = MoLEModel.from_pretrained(first).save_pretrained(tmp_path / "m2")
    a, b = model_experts(first), model_experts(again)
    assert list(a) == ["expert_00", "expert_01", "expert_02", "shared"] and a == b
    assert [r["status"] for r in compare(a, b)] == ["unchanged"] * 4
    assert a["shared"]["kind"] == "shared" and a["expert_01"]["kind"] == "expert"


def test_an_expert_changed_after_its_lineage_was_written_is_flagged(tmp_path: Path) -> None:
    d = lineage_model().save_pretrained(tmp_path / "m")
    recorded = model_experts(d)["expert_01"]["sha256"]
    tensors = load_file(str(d / "experts" / "expert_01" / WEIGHTS))
    save_file({k: v * 2 for k, v in tensors.items()}, str(d / "experts" / "expert_01" / WEIGHTS))
    now = model_experts(d)["expert_01"]
    assert now["sha256"] != recorded and now["recorded_sha256"] == recorded
    assert brief(now)["recorded_sha256"] == recorded


def test_a_model_without_lineage_still_has_content_hashes(tmp_path: Path) -> None:
    model = lineage_model(shared=None)
    model.lineage = {}
    d = model.save_pretrained(tmp_path / "m")
    assert not list(d.rglob(LINEAGE))
    records = model_experts(d)
    assert set(records) == {"expert_00", "expert_01", "expert_02"}
    sha = adapter_digest(d / "experts" / "expert_00")
    assert records["expert_00"] == {"id": "expert_00", "kind": "expert", "sha256": sha}


def test_merge_records_its_parents_and_keeps_the_other_experts_as_they_were(tmp_path: Path) -> None:
    model = lineage_model(num_experts=4)
    with torch.no_grad():
        for layer in model.bank.values():  # expert 2 := expert 0, so the plan merges them
            layer.set_expert(2, *layer.expert(0))
    before = model.save_pretrained(tmp_path / "before")
    model = MoLEModel.from_pretrained(before)
    sim = np.eye(4)
    sim[0, 2] = sim[2, 0] = 1.0
    decisions = plan(np.full(4, 0.25), sim, MergeConfig(utilization_floor=0.0, similarity_ceiling=0.999))
    after = apply_plan(model, decisions, tmp_path / "after", build={"stage": "merge-prune", "config_hash": "c"})
    old, new = model_experts(before), model_experts(after)
    status = {r["id"]: r["status"] for r in compare(old, new)}
    assert status == {"expert_00+expert_02": "added", "expert_01": "unchanged", "expert_03": "unchanged",
                      "shared": "unchanged", "expert_00": "removed", "expert_02": "removed"}  # fmt: skip
    merged = new["expert_00+expert_02"]
    assert merged["parents"] == [{"id": "expert_00", "sha256": old["expert_00"]["sha256"]},
                                 {"id": "expert_02", "sha256": old["expert_02"]["sha256"]}]  # fmt: skip
    assert merged["rows"] == 10 + 12 and merged["cluster"] == [0, 2] and merged["made_by"]["stage"] == "merge-prune"
    assert new["expert_01"] == old["expert_01"]  # its record carried over whole


def test_compare_orders_new_experts_then_removed_ones() -> None:
    old = {"a": {"sha256": "1"}, "b": {"sha256": "2"}, "c": {"sha256": "3"}}
    new = {"b": {"sha256": "2"}, "a": {"sha256": "9"}, "d": {"sha256": "4"}}
    rows = compare(old, new)
    assert [(r["id"], r["status"]) for r in rows] == [("b", "unchanged"), ("a", "changed"), ("d", "added"),
                                                      ("c", "removed")]  # fmt: skip
    assert rows[3]["new"] is None and rows[2]["old"] is None and rows[1]["old"] == {"sha256": "1"}
