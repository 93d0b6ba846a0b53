"""The first tokens of a sequence through the shared expert alone (experts.sink_tokens): in the MoLE model under its
routers and forced routing, in cached decoding, in the merged path, and in the packed bank of co-training."""

from __future__ import annotations

import pytest
import torch

from mole.base import load_base
from mole.nn.decode import FirstTokens
from mole.nn.model import MoLEModel
from mole.nn.packed_bank import PackedBank
from mole.nn.router import first_tokens
from mole.nn.spec import MoLESpec
from mole.sections import LoraSection
from tests.nn.decoding import assert_cached_decoding_matches

IDS = torch.tensor([[5, 17, 40, 9, 33], [0, 0, 12, 61, 7]])  # row 1 left-padded
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


def test_first_tokens_counts_real_tokens_and_carries_on() -> None:
    first, seen = first_tokens(2, MASK.shape, MASK)
    assert first.tolist() == [[True, True, False, False, False], [False, False, True, True, False]]
    assert seen.tolist() == [5, 3]
    # a continued forward: row 1 has had 1 real token, row 0 none (an empty prompt), then one padded step
    more, seen = first_tokens(2, (2, 2), torch.tensor([[0, 1], [1, 1]]), torch.tensor([0, 1]))
    assert more.tolist() == [[False, True], [True, False]]
    assert seen.tolist() == [1, 3]


def test_the_tracker_stops_once_every_sequence_is_past_its_first_tokens() -> None:
    track = FirstTokens(1, blocks=1)
    assert track.mark(0, MASK.shape, MASK, continued=False).sum() == 2
    assert track.mark(0, (2, 1), None, continued=True) is None  # decode steps: nothing to mark, nothing counted
    track = FirstTokens(3, blocks=1)
    track.mark(0, (1, 2), None, continued=False)
    assert track.mark(0, (1, 1), None, continued=True).tolist() == [[True]]  # the 3rd token, decoded
    assert track.mark(0, (1, 1), None, continued=True) is None


def _model(sink: int) -> MoLEModel:
    base, tok = load_base("tiny", seed=0)
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=["a", "b", "c"], r=4, lora_alpha=8.0,
                    target_modules=["q_proj", "v_proj"], top_k=1, shared="shared", sink_tokens=sink)  # fmt: skip
    torch.manual_seed(0)  # the bank's A matrices and the routers are drawn at construction: the same in every call
    model = MoLEModel(base=base, tokenizer=tok, spec=spec).eval()
    with torch.no_grad():
        for layer in model.bank.values():
            layer.lora_B.normal_(std=0.5)  # experts (and the shared one) that differ, so each shows in the logits
        for router in model.routers:
            router.gate.weight.normal_(std=1.0)
    return model


def _routed_experts_zeroed(model: MoLEModel) -> None:
    with torch.no_grad():
        for layer in model.bank.values():
            layer.lora_B[:, : layer.num_experts * layer.r] = 0.0


@pytest.mark.parametrize("route", [None, torch.tensor([2, 1])])
def test_the_first_token_sees_the_shared_expert_only(route: torch.Tensor | None) -> None:
    """Its logits are those of a model whose routed experts are zero; the later tokens' are not."""
    model, shared_only = _model(1), _model(1)
    _routed_experts_zeroed(shared_only)
    with torch.no_grad():
        a = model(IDS, MASK, route=route).logits
        b = shared_only(IDS, MASK, route=route).logits
        every = _model(0)(IDS, MASK, route=route).logits  # the same experts, the first token routed as well
    torch.testing.assert_close(a[0, 0], b[0, 0])
    torch.testing.assert_close(a[1, 2], b[1, 2])  # row 1's first real token, after its padding
    assert not torch.allclose(a[0, 1:], b[0, 1:], atol=1e-3)
    assert not torch.allclose(a[0, 0], every[0, 0], atol=1e-3)
    routed = model(IDS, MASK, route=route).routing[0]
    assert routed.weights[0, 0].sum() == 0 and routed.weights[0, 1].sum() == 1


@pytest.mark.parametrize("sink", [1, 3])
def test_cached_decoding_equals_a_full_forward(sink: int) -> None:
    model = _model(sink)
    assert_cached_decoding_matches(model, IDS, MASK)


def test_the_merged_path_keeps_the_first_tokens_to_the_shared_expert() -> None:
    model = _model(1)
    route = torch.tensor([1, 1])  # one expert for the whole batch: generate merges it into the base weights
    kwargs = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    merged = model.generate(IDS, MASK, route=route, **kwargs)
    model.merge_forced = False
    eager = model.generate(IDS, MASK, route=route, **kwargs)
    assert torch.equal(merged.sequences, eager.sequences)
    for m, e in zip(merged.logits, eager.logits, strict=True):
        torch.testing.assert_close(m, e, rtol=1e-4, atol=1e-4)


def test_the_packed_bank_routes_the_first_tokens_to_the_shared_slot() -> None:
    base, _ = load_base("tiny", seed=0)
    lora = LoraSection(r=4, lora_alpha=8, target_modules=["q_proj"])
    modules = [n for n, m in base.named_modules() if n.endswith("q_proj")]
    with PackedBank(base, lora, num_experts=2, modules=modules, shared=True, sink_tokens=2) as bank:
        right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
        bank.route(torch.tensor([0, 1]), seq_len=4, mask=right)
        mix = bank.state.output.mix(slots=3, scale=1.0)  # (B, T, S): the routed slots, then the shared one
    assert mix[..., :2].sum(-1).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert mix[..., 2].tolist() == [[1, 1, 1, 1]] * 2


def test_routing_diagnostics_leave_the_sink_tokens_out() -> None:
    """Per-row mean routing weights count only the routed tokens: with the sink they still sum to 1 per block."""
    from mole.routing.diagnostics import batch_routing

    model = _model(1)
    with torch.no_grad():
        res = model(IDS, MASK)
    batch = {"attention_mask": MASK, "labels": IDS}  # every real token a label: the whole row counts
    weights, _ = batch_routing(res.routing, batch, prompt_only=True)  # (B, L, E)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    assert res.routing[0].weights[0, 0].sum() == 0  # (the first token itself routed to no expert)
