"""MoLEModel invariants on a tiny random Llama: base equivalence, round-trips, generation, trainable set."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mole.base import load_base
from mole.nn.model import MoLEModel
from mole.nn.spec import MoLESpec

E, R = 4, 4


def _model(top_k: int = 2, zero_b: bool = False) -> tuple[MoLEModel, torch.nn.Module]:
    base, tok = load_base("tiny", seed=0)
    ref, _ = load_base("tiny", seed=0)
    spec = MoLESpec(
        base_model={"name": "tiny", "seed": 0},
        expert_ids=[f"expert_{i:02d}" for i in range(E)],
        r=R,
        lora_alpha=8.0,
        target_modules=["q_proj", "v_proj"],
        top_k=top_k,
    )
    model = MoLEModel(base=base, tokenizer=tok, spec=spec)
    if not zero_b:
        with torch.no_grad():
            for layer in model.bank.values():
                layer.lora_B.normal_(std=0.5)
            for router in model.routers:
                router.gate.weight.normal_(std=1.0)
    return model.eval(), ref.eval()


def _ids(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(3, 250, (n, t))


def test_zero_b_gives_the_base_logits_exactly() -> None:
    model, ref = _model(zero_b=True)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_nonzero_experts_change_the_output() -> None:
    model, ref = _model()
    ids = _ids()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, ref(ids).logits)


def test_only_expert_and_router_parameters_require_grad() -> None:
    model, _ = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_A" in n or ".lora_B" in n or n.startswith("routers.") for n in trainable)
    assert {id(p) for p in model.expert_parameters() + model.router_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


def test_every_block_routes_k_experts_per_token() -> None:
    model, _ = _model(top_k=2)
    out = model(_ids())
    assert len(out.routing) == model.base.config.num_hidden_layers
    for r in out.routing:
        assert ((r.weights > 0).sum(-1) == 2).all()
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(r.weights.shape[:2]))
    assert out.aux_loss.item() > 0


def test_expert_round_trips_through_a_peft_adapter_dir_bit_exactly(tmp_path: Path) -> None:
    from peft import PeftModel

    model, _ = _model()
    model.export_expert(2, tmp_path / "e2")
    other, _ = _model(zero_b=True)
    other.load_expert(0, tmp_path / "e2")
    for name, layer in model.bank.items():
        a, b = layer.expert(2)
        a2, b2 = other.bank[name].expert(0)
        assert torch.equal(a, a2) and torch.equal(b, b2)
    # The exported dir is a standard peft adapter: peft loads it, and its output equals the bank forced to expert 2.
    base, _ = load_base("tiny", seed=0)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "e2")).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, model(ids, route=torch.tensor([2, 2])).logits, rtol=1e-5, atol=1e-5
        )


def test_save_then_load_gives_identical_logits(tmp_path: Path) -> None:
    model, _ = _model()
    model.save_pretrained(tmp_path / "mole")
    assert {p.name for p in (tmp_path / "mole").iterdir()} >= {"mole_config.json", "router.safetensors", "experts"}
    loaded = MoLEModel.from_pretrained(tmp_path / "mole")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_generate_with_kv_cache_matches_repeated_full_forwards() -> None:
    model, _ = _model()
    ids = _ids(n=1, t=6)
    with torch.no_grad():
        cached = model.generate(ids, torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=True)
        seq = ids
        for _ in range(8):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_forced_route_matches_single_expert_and_bad_adapter_is_refused(tmp_path: Path) -> None:
    model, _ = _model()
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="not a peft adapter dir"):
        model.load_expert(0, tmp_path / "bad")
    ids = _ids()
    with torch.no_grad():
        a = model(ids, route=torch.tensor([1, 3])).logits
        b = model(ids[:1], route=torch.tensor([1])).logits
    torch.testing.assert_close(a[:1], b, rtol=1e-5, atol=1e-5)


def test_score_matches_the_mean_loss_and_cluster_routing_uses_the_clusterer() -> None:
    from mole.cluster.clustering import Clusterer
    from mole.cluster.embed import TfidfEmbedder
    from mole.data.tokenize import collate, encode_row

    model, _ = _model()
    rows = [
        {"prompt": "Add 2 and 3.\nAnswer:", "completion": "5"},
        {"prompt": "Reverse abc\nAnswer:", "completion": "cba"},
    ]
    batch = collate([encode_row(model.tokenizer, r, max_length=64) for r in rows], pad_id=0)
    nll, count = model.score(batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        loss = model(batch["input_ids"][:1], batch["attention_mask"][:1], batch["labels"][:1]).lm_loss
    torch.testing.assert_close(nll[0] / count[0], loss, rtol=1e-5, atol=1e-5)
    assert count.tolist() == [3, 5]  # " 5" + eos, " cba" + eos: one token per byte
    texts = ["apple pie recipe"] * 4 + ["train timetable"] * 4
    emb = TfidfEmbedder(dim=2).fit(texts)
    x = emb.encode(texts)
    model.clusterer = Clusterer(embedder=emb, centroids=torch.tensor(x[[0, 4]]).numpy())
    model.spec.clusters = [1, 0, 2, 3]  # expert 0 serves cluster 1, expert 1 serves cluster 0
    assert model.route_by_cluster(["apple pie", "train"]).tolist() == [1, 0]
    outs = model.generate_text(["apple pie", "train"], max_new_tokens=3, routing="cluster")
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


def _crafted_model_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A saved MoLE dir whose base is a local HF dir with an ``auto_map`` to its own code, and the code's marker."""
    base, tok = load_base("tiny", seed=0)
    base_dir, marker = tmp_path / "base", tmp_path / "remote-code-ran"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (base_dir / "config.json").write_text(json.dumps(config))
    (base_dir / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\nclass EvilForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    model, _ = _model()
    model.save_pretrained(tmp_path / "mole")
    spec_file = tmp_path / "mole" / "mole_config.json"
    spec = json.loads(spec_file.read_text())
    spec["base_model"] = {"name": str(base_dir), "trust_remote_code": True}
    spec_file.write_text(json.dumps(spec))
    return tmp_path / "mole", marker


def test_a_model_dir_cannot_switch_on_remote_code(tmp_path: Path) -> None:
    mole_dir, marker = _crafted_model_dir(tmp_path)
    with pytest.raises(PermissionError, match=r"mole_config\.json: sets trust_remote_code=true.*--trust-remote-code"):
        MoLEModel.from_pretrained(mole_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mole.cli", "predict", "--model", str(mole_dir), "--prompt", "hi"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "sets trust_remote_code=true" in " ".join(proc.stderr.split())
    assert not marker.exists()
    # The user's own permission is what turns it on (and the crafted code then runs: the check above could fail).
    with contextlib.suppress(Exception):
        MoLEModel.from_pretrained(mole_dir, trust_remote_code=True)
    assert marker.exists()


def test_a_saved_embedder_cannot_switch_on_remote_code(tmp_path: Path) -> None:
    from mole.cluster.embed import BaseModelEmbedder, load_embedder

    BaseModelEmbedder(base_spec="tiny", trust_remote_code=True).save(tmp_path)
    with pytest.raises(PermissionError, match=r"embedder\.json: sets trust_remote_code=true"):
        load_embedder(tmp_path)
    assert load_embedder(tmp_path, trust_remote_code=True).load_kwargs["trust_remote_code"] is True
    BaseModelEmbedder(base_spec="tiny").save(tmp_path)
    assert load_embedder(tmp_path).load_kwargs["trust_remote_code"] is False


def test_prompts_get_the_training_prompts_ending_unless_raw() -> None:
    model, _ = _model()
    model.spec.prompt_suffix = "\nAnswer:"
    assert model.spec.templated("2 + 2?") == "2 + 2?\nAnswer:"
    assert model.spec.templated("2 + 2?\nAnswer:") == "2 + 2?\nAnswer:"
    templated = model.generate_text(["2 + 2?", "Name a colour. "], max_new_tokens=6)
    by_hand = model.generate_text(["2 + 2?\nAnswer:", "Name a colour.\nAnswer:"], max_new_tokens=6, raw=True)
    raw = model.generate_text(["2 + 2?", "Name a colour. "], max_new_tokens=6, raw=True)
    assert templated == by_hand and raw != templated


def test_save_pretrained_keeps_cluster_routing_and_experts_load_with_auto_peft(tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    from mole.cluster.clustering import Clusterer
    from mole.cluster.embed import TfidfEmbedder

    base, tok = load_base("tiny", seed=0)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, _ = _model()
    model.spec.base_model = {"name": str(tmp_path / "base")}
    texts = ["apple pie recipe"] * 4 + ["train timetable"] * 4
    emb = TfidfEmbedder(dim=2).fit(texts)
    model.clusterer = Clusterer(embedder=emb, centroids=emb.encode(texts)[[0, 4]])
    model.spec.clusters = [1, 0, 2, 3]
    model.save_pretrained(tmp_path / "mole")
    loaded = MoLEModel.from_pretrained(tmp_path / "mole")
    assert loaded.clusterer is not None
    prompts = ["apple pie", "train"]
    assert loaded.route_by_cluster(prompts).tolist() == model.route_by_cluster(prompts).tolist() == [1, 0]
    assert loaded.generate_text(prompts, max_new_tokens=4, routing="cluster") == model.generate_text(
        prompts, max_new_tokens=4, routing="cluster"
    )
    # Each expert dir names a base transformers can load, so plain peft loads it on its own.
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "mole" / "experts" / "expert_01"))
    ids = _ids(1)
    with torch.no_grad():
        want = model(ids, route=torch.tensor([1])).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
