"""The first-token gate (router.first_gate): each sequence's first real token routed, in every block, to the gate's
expert; the rest by the routers; in cached decoding, save / load, merge-prune and its fit on rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mole.base import load_base
from mole.nn.first_gate import PREFIX
from mole.nn.model import MoLEModel
from mole.nn.router import TokenTopKRouter
from mole.nn.spec import MoLESpec
from tests.nn.decoding import assert_cached_decoding_matches

IDS = torch.tensor([[5, 17, 40, 9, 33], [0, 0, 12, 61, 7], [88, 3, 140, 2, 19]])  # row 1 left-padded
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
FIRST = torch.tensor([0, 2, 0])  # each row's first real position
AFTER_BOS = FIRST + 1  # the first after a BOS, where the tokenizer adds one (the tiny base's does)


def _model(gate: bool, top_k: int = 1, experts: int = 3, bos: bool = True) -> MoLEModel:
    """The tiny base with random experts, routers and gate; ``bos=False``: no tokenizer, so no BOS is assumed."""
    base, tok = load_base("tiny", seed=0)
    tok = tok if bos else None
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=[f"e{i}" for i in range(experts)], r=4,
                    lora_alpha=8.0, target_modules=["q_proj", "v_proj"], top_k=top_k, clusters=list(range(experts)),
                    first_gate=gate)  # fmt: skip
    model = MoLEModel(base=base, tokenizer=tok, spec=spec).eval()
    g = torch.Generator().manual_seed(0)  # every weight drawn here: the same with and without the gate
    with torch.no_grad():
        for layer in model.bank.values():
            layer.lora_A.normal_(std=0.2, generator=g)
            layer.lora_B.normal_(std=0.5, generator=g)  # experts that differ, so each shows in the logits
        for p in model.routers.parameters():
            p.normal_(std=1.0, generator=g)
        if gate:
            gen = torch.Generator().manual_seed(1)
            for p in model.first_gate.parameters():
                p.normal_(std=1.0, generator=gen)
    return model


def _choice(model: MoLEModel, first: torch.Tensor = AFTER_BOS) -> torch.Tensor:
    """The gate's expert for each row, computed here from the first token's embedding (block 0's input)."""
    emb = model.base.get_input_embeddings()(IDS[torch.arange(3), first])  # (B, D)
    return model.first_gate.gate(emb).argmax(-1)


def test_the_choice_differs_between_rows() -> None:  # (else the tests below could not tell the rows' routes apart)
    assert _model(True).first_gate.lead == 1 and _model(True, bos=False).first_gate.lead == 0
    assert len(set(_choice(_model(True)).tolist())) > 1
    assert len(set(_choice(_model(True), FIRST).tolist())) > 1


@pytest.mark.parametrize(("top_k", "bos"), [(1, True), (2, True), (1, False)])
def test_the_first_token_goes_to_the_gates_expert_in_every_block(top_k: int, bos: bool) -> None:
    """The first token after the BOS (if any) goes to the gate's choice; every other token, the BOS too, to the
    routers' (compared in block 0, whose input the gate does not change)."""
    model, plain = _model(True, top_k, bos=bos), _model(False, top_k, bos=bos)
    first = AFTER_BOS if bos else FIRST
    choice = _choice(model, first)
    with torch.no_grad():
        out, ref = model(IDS, MASK), plain(IDS, MASK)
    for block, (o, r) in enumerate(zip(out.routing, ref.routing, strict=True)):
        for row in range(3):
            f = int(first[row])
            want = torch.nn.functional.one_hot(choice[row], 3).float()
            torch.testing.assert_close(o.weights[row, f], want, msg=f"block {block} row {row}")
            assert len(set(o.indices[row, f].tolist())) == top_k  # no slot repeats an expert
        if block == 0:  # the other tokens as the routers route them (block 0: the same input as without the gate)
            later = MASK.bool().clone()
            later[torch.arange(3), first] = False
            torch.testing.assert_close(o.weights[later], r.weights[later])
    rows = torch.arange(3)
    assert not torch.allclose(out.logits[rows, first], ref.logits[rows, first], atol=1e-3)
    if not bos:  # the first token's logits are those of its row forced to that expert (a first token sees itself)
        with torch.no_grad():
            forced = model(IDS, MASK, route=choice).logits
        torch.testing.assert_close(out.logits[rows, first], forced[rows, first], rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_a_full_forward() -> None:
    model = _model(True)
    assert_cached_decoding_matches(model, IDS, MASK)


def test_a_prompt_of_a_bos_alone_decodes_as_a_full_forward_routes() -> None:
    """Its first token is the first decoded one: routed by the gate there, in the cache as in a full forward (and the
    BOS by the routers in both)."""
    model = _model(True)
    bos = model.tokenizer.bos_token_id
    ids, mask = torch.tensor([[5, 17, 40, 9, 33], [0, 0, 0, 0, bos]]), torch.tensor([[1] * 5, [0, 0, 0, 0, 1]])
    assert_cached_decoding_matches(model, ids, mask)


def test_save_and_load_keep_the_gate(tmp_path: Path) -> None:
    """Its tensors go into router.safetensors beside the routers'; a file without them is refused, naming it."""
    model = _model(True)
    model.save_pretrained(tmp_path / "m")
    router_file = tmp_path / "m" / "router.safetensors"
    assert {k for k in load_file(router_file) if k.startswith(PREFIX)} == {PREFIX + "gate.weight", PREFIX + "gate.bias"}
    loaded = MoLEModel.from_pretrained(tmp_path / "m")
    assert loaded.spec.first_gate
    torch.testing.assert_close(loaded.first_gate.gate.weight, model.first_gate.gate.weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS, MASK).logits, model(IDS, MASK).logits)
    save_file({k: v for k, v in load_file(router_file).items() if not k.startswith(PREFIX)}, str(router_file))
    with pytest.raises(ValueError, match="router.safetensors: does not fit"):
        MoLEModel.from_pretrained(tmp_path / "m")
    _model(False).save_pretrained(tmp_path / "plain")
    assert not any(k.startswith(PREFIX) for k in load_file(tmp_path / "plain" / "router.safetensors"))


def test_merging_two_identical_experts_keeps_the_first_tokens_route(tmp_path: Path) -> None:
    """Merged rows are the mean + log 2 (as the routers'): a first token sent to either copy goes to the merged one."""
    from mole.merge import apply_plan

    model = _model(True, experts=4)
    with torch.no_grad():
        for layer in model.bank.values():
            layer.set_expert(3, *layer.expert(0))
        for gate in [*(r.gate for r in model.routers), model.first_gate.gate]:
            gate.weight[3], gate.bias[3] = gate.weight[0], gate.bias[0]
    decision = {"action": "merge", "experts": [0, 3], "ids": ["e0", "e3"], "similarity": 1.0, "weights": [0.5, 0.5]}
    merged = MoLEModel.from_pretrained(apply_plan(model, [decision], tmp_path / "m"))
    assert merged.spec.first_gate and merged.first_gate.gate.weight.shape[0] == 3
    expert_of = {0: 0, 1: 1, 2: 2, 3: 0}
    new = merged.first_gate.gate(model.base.get_input_embeddings()(IDS[torch.arange(3), AFTER_BOS])).argmax(-1)
    assert new.tolist() == [expert_of[int(c)] for c in _choice(model)]


def test_a_merged_row_leaves_out_a_row_the_gate_had_no_rows_for(tmp_path: Path) -> None:
    from mole.merge import apply_plan
    from mole.nn.logistic import NEVER

    model = _model(True, experts=4)
    with torch.no_grad():
        model.first_gate.gate.bias[3] = NEVER  # expert 3: no rows in the fit, never chosen
    decision = {"action": "merge", "experts": [0, 3], "ids": ["e0", "e3"], "similarity": 1.0, "weights": [0.5, 0.5]}
    merged = MoLEModel.from_pretrained(apply_plan(model, [decision], tmp_path / "m")).first_gate.gate
    torch.testing.assert_close(merged.weight[0], model.first_gate.gate.weight[0])  # expert 0's row, as it was
    torch.testing.assert_close(merged.bias[0], model.first_gate.gate.bias[0])


def test_the_fit_learns_the_rows_experts_from_their_first_tokens() -> None:
    from mole.nn.logistic import NEVER
    from mole.routing.first_token import fit_first_gate

    model = _model(True)
    words = {0: ["apple", "pear"], 1: ["river", "lake"]}  # expert 2 has no rows: never chosen
    rows = [{"id": f"{w}{i}", "text": f"{w} number {i} and more"} for e in (0, 1) for w in words[e] for i in range(6)]
    experts = [e for e in (0, 1) for _ in words[e] for _ in range(6)]
    report = fit_first_gate(model, rows, experts, c=1.0, max_length=16)
    assert report == {"rows": 24, "distinct_first_tokens": 4, "train_accuracy": 1.0}
    assert float(model.first_gate.gate.bias[2].detach()) == NEVER
    ids = torch.tensor([model.tokenizer(w)["input_ids"][:2] for w in ("pear", "lake", "apple")])  # (3, 2): BOS, 1st
    with torch.no_grad():
        routing = model(ids).routing
    assert [int(routing[-1].indices[i, 1, 0]) for i in range(3)] == [0, 1, 0]
    np.testing.assert_array_equal(model.first_gate.gate.weight[2].detach().numpy(), 0.0)


def test_a_gate_with_one_class_routes_every_first_token_to_it() -> None:
    from mole.routing.first_token import fit_first_gate

    model = _model(True)
    rows = [{"id": str(i), "text": f"word{i} here"} for i in range(4)]
    assert fit_first_gate(model, rows, [1] * 4, c=1.0, max_length=8)["train_accuracy"] == 1.0
    with torch.no_grad():
        assert model(IDS, MASK).routing[-1].indices[torch.arange(3), AFTER_BOS, 0].tolist() == [1, 1, 1]


def test_routed_at_keeps_the_other_tokens() -> None:
    router = TokenTopKRouter(dim=8, num_experts=4, top_k=2)
    out = router(torch.randn(2, 3, 8))
    where = torch.tensor([[True, False, False], [False, True, False]])
    new = out.routed_at(where, torch.tensor([3, 1]))
    assert new.indices[0, 0].tolist() == [3, 0] and new.indices[1, 1].tolist() == [1, 2]
    assert new.topk_weights[0, 0].tolist() == [1.0, 0.0]
    torch.testing.assert_close(new.weights[~where], out.weights[~where])
    torch.testing.assert_close(new.weights.sum(-1), torch.ones(2, 3))


def test_the_packed_bank_trains_the_first_token_through_its_given_expert() -> None:
    """Co-training with experts.first_gate: a row's first token (after a BOS) goes to ``first[b]``, the rest to the
    row's expert."""
    from mole.nn.packed_bank import PackedBank
    from mole.sections import LoraSection

    base, _ = load_base("tiny", seed=0)
    lora = LoraSection(r=4, lora_alpha=8, target_modules=["q_proj"])
    modules = [n for n, m in base.named_modules() if n.endswith("q_proj")]
    with PackedBank(base, lora, num_experts=3, modules=modules, shared=True, lead=1) as bank:
        bank.route(torch.tensor([0, 1, 2]), seq_len=5, mask=MASK, first=torch.tensor([2, 2, 0]))
        routed = bank.state.output.mix(slots=4, scale=1.0)[..., :3].argmax(-1)  # (B, T) the routed expert
    assert routed.tolist() == [[0, 2, 0, 0, 0], [1, 1, 1, 2, 1], [2, 0, 2, 2, 2]]  # (row 1: padding at 0, 1)
