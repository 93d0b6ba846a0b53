"""Gallery experts in builds (``experts.gallery``): imported adapters join the bank after the trained experts, keep
their weights through the joint phase, and get gate rows warm-started from the rows given to ``add-expert --rows``,
or else from the train rows they serve better than those rows' own experts; one that serves none is never routed to.

The stages run for real on the tiny preset. The gallery's adapters are made with plain peft and a plain training
loop, as a user would bring them: one tuned on a skill the build also trains an expert for (no rows given), one on
a skill the build's data lack (with its rows), and one of random weights (no rows).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from mole import stages
from mole.base import load_base
from mole.config import load_config
from mole.data.tokenize import eval_batches
from mole.nn.adapters import adapter_keys, adapter_scale, read_adapter
from mole.nn.lineage import adapter_digest, model_experts
from mole.nn.model import MoLEModel
from mole.routing.diagnostics import row_routing
from mole.training.gallery import add_expert, gallery_dir
from tests.test_gallery import peft_adapter
from tests.test_incremental import demo_by_skill, write_rows

TRAINED, ABSENT = ("arithmetic", "unit_conversion", "date_arithmetic", "string_manipulation"), "json_extraction"
LIGHT = ["experts.steps=8", "experts.shared_steps=8", "experts.multitask_baseline=false", "router.steps=4",
         "cluster.k=4", "cluster.embedder=tfidf", "merge.refit_steps=0"]  # fmt: skip
GALLERY = ["tuned", "given", "junk"]


def tuned_adapter(directory: Path, rows: list[dict[str, Any]], *, steps: int = 12) -> Path:
    """A LoRA trained with plain peft on ``rows`` (the tiny base, q/v projections, r = 4)."""
    base, tok = load_base("tiny", seed=0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [b for _, b in eval_batches(rows, tok, batch_size=8, max_length=64)]
    model.train()
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gallery_build")
    by = demo_by_skill(30)
    source = write_rows(root / "train.jsonl", [r for s in TRAINED for r in by[s][:20]])
    evals = write_rows(root / "eval.jsonl", [r for s in (*TRAINED, ABSENT) for r in by[s][24:30]])
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={root / 'ws'}", f"data.source={source}",
                                                       f"data.eval_source={evals}", *LIGHT])  # fmt: skip
    add_expert(cfg, tuned_adapter(root / "tuned", by[TRAINED[0]][:20]), "tuned")
    given_rows = write_rows(root / "given_rows.jsonl", by[ABSENT][:20])
    add_expert(cfg, tuned_adapter(root / "given", by[ABSENT][:20]), "given", rows=given_rows)
    add_expert(cfg, peft_adapter(root / "junk"), "junk")
    cfg = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"gallery": GALLERY})})
    for stage in (stages.prepare, stages.cluster, stages.train_experts):
        stage(cfg)
    model_dir = cfg.path("artifacts/mole")
    # The gates as warm-started (no joint phase): where each kind of row is routed.
    stages.train_router(cfg.model_copy(update={"router": cfg.router.model_copy(update={"steps": 0})}))
    warm = MoLEModel.from_pretrained(model_dir)
    heldout = {s: by[s][:20] for s in (*TRAINED, ABSENT)}  # the rows the gates were fitted on
    routed = {s: row_routing(warm, rows, batch_size=8, max_length=64)[0].mean((0, 1)) for s, rows in heldout.items()}
    stages.train_router(cfg)
    metrics = json.loads((model_dir / "train_metrics.json").read_text())
    return {"cfg": cfg, "by": by, "dir": model_dir, "metrics": metrics, "warm": routed, "heldout": heldout}


def test_gallery_experts_join_the_bank_after_the_trained_ones_serving_no_cluster(built: dict[str, Any]) -> None:
    spec = json.loads((built["dir"] / "mole_config.json").read_text())
    assert spec["expert_ids"] == ["expert_00", "expert_01", "expert_02", "expert_03", *GALLERY]
    assert spec["clusters"][4:] == [[], [], []] and sorted(spec["clusters"][:4]) == [0, 1, 2, 3]
    lineage = model_experts(built["dir"])
    for name in GALLERY:
        assert lineage[name]["kind"] == "gallery" and lineage[name]["joint_steps"] == 0
        assert lineage[name]["parents"][0]["sha256"] == adapter_digest(gallery_dir(built["cfg"]) / name)


def test_the_joint_phase_leaves_gallery_experts_as_imported(built: dict[str, Any]) -> None:
    """Each gallery slot of the saved model computes its adapter's own update, B A x scale, module by module."""
    model = MoLEModel.from_pretrained(built["dir"])
    assert built["metrics"]["joint"]["loss"], "precondition: the joint phase ran"
    for slot, name in enumerate(GALLERY, start=4):
        config, tensors = read_adapter(gallery_dir(built["cfg"]) / name)
        for module, layer in model.bank.items():
            key_a, key_b = adapter_keys(module)
            a, b = layer.expert(slot)
            want = tensors[key_b].float() @ tensors[key_a].float() * adapter_scale(config)
            torch.testing.assert_close(b @ a * model.spec.lora_alpha / model.spec.r, want, rtol=1e-5, atol=1e-6)


def test_gate_rows_start_from_given_rows_served_rows_or_never(built: dict[str, Any]) -> None:
    info = built["metrics"]["gallery"]
    assert info["given"] == {"slot": 5, "rows": 20, "source": "add-expert --rows"}, info
    assert info["tuned"]["source"] == "served better" and info["tuned"]["rows"] >= 1
    assert info["junk"] == {"slot": 6, "rows": 0, "source": "none"}
    # As warm-started (on a tiny random base, whose block inputs barely tell skills apart): the rows given with an
    # expert go to it more than any other skill's rows do.
    warm = built["warm"]  # skill -> (E,) mean routing weight of its held-out rows
    shown = {s: w.round(3).tolist() for s, w in warm.items()}
    assert warm[ABSENT][5] > max(warm[s][5] for s in TRAINED), shown
    # The random adapter serves nothing better: no token of any row is routed to it, before or after the joint phase.
    model = MoLEModel.from_pretrained(built["dir"])
    rows = [r for rs in built["heldout"].values() for r in rs]
    assert np.all(row_routing(model, rows, batch_size=8, max_length=64)[0][..., 6] == 0)
    assert all(w[6] == 0 for w in warm.values())


def test_a_gallery_expert_the_gallery_lacks_is_named_and_nothing_is_written(built: dict[str, Any]) -> None:
    cfg = built["cfg"]
    missing = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"gallery": ["tuned", "nope"]})})
    before = adapter_digest(built["dir"] / "experts" / "expert_00")
    named = r"experts.gallery: 'nope' is not in the gallery .* \(it has \['given', 'junk', 'tuned'\]; mole add-expert"
    with pytest.raises(ValueError, match=named):
        stages.train_router(missing)
    twice = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"gallery": ["junk", "junk"]})})
    with pytest.raises(ValueError, match=r"experts.gallery: \['junk'\] named more than once"):
        stages.train_router(twice)
    assert adapter_digest(built["dir"] / "experts" / "expert_00") == before


def test_gallery_names_are_checked_with_the_config() -> None:
    from mole.config import ConfigError

    with pytest.raises(ConfigError, match="experts.gallery"):
        load_config(None, preset="tiny", overrides=["experts.gallery=['../escape']"])


def test_a_model_with_gallery_experts_is_the_previous_build_of_an_incremental_one(
    built: dict[str, Any], tmp_path: Path
) -> None:
    """Gallery experts serve no cluster: a previous model with them still fits an incremental build, which keeps
    their gate rows with the trained experts' (the same experts in the same slots) and them as imported."""
    cfg, by = built["cfg"], built["by"]
    source = write_rows(tmp_path / "train.jsonl", [r for s in TRAINED for r in by[s][:20]] + by[TRAINED[1]][20:24])
    ws = tmp_path / "ws"
    shutil.copytree(gallery_dir(cfg), ws / "artifacts" / "gallery")
    inc = cfg.model_copy(update={"workspace": str(ws), "data": cfg.data.model_copy(update={"source": str(source)}),
                                 "build": cfg.build.model_copy(update={"incremental": "always",
                                                                       "previous": str(cfg.path("."))})})  # fmt: skip
    for stage in (stages.prepare, stages.cluster, stages.train_experts, stages.train_router):
        stage(inc)
    lifecycle = json.loads((ws / "reports" / "lifecycle.json").read_text())
    assert lifecycle["mode"] == "incremental" and lifecycle["new_rows"] == 4, lifecycle
    metrics = json.loads((ws / "artifacts" / "mole" / "train_metrics.json").read_text())
    assert metrics["warm_start"]["method"] == "previous", metrics["warm_start"]
    old, new = model_experts(built["dir"]), model_experts(ws / "artifacts" / "mole")
    assert all(new[g]["sha256"] == old[g]["sha256"] for g in GALLERY)
