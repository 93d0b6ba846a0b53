"""Prefix pooling of router logits (router.pool = prefix): causal, padding-blind, and the same in cached decoding."""

from __future__ import annotations

import pytest
import torch

from mole.base import load_base
from mole.nn.model import MoLEModel
from mole.nn.router import TokenTopKRouter, prefix_mean
from mole.nn.spec import MoLESpec


def test_prefix_mean_averages_the_real_tokens_so_far() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # row 1 left-padded
    pooled, (total, count) = prefix_mean(logits, mask)
    for b in range(2):
        real = [t for t in range(5) if mask[b, t]]
        for t in real:
            want = logits[b, [u for u in real if u <= t]].mean(0)
            torch.testing.assert_close(pooled[b, t], want)
    torch.testing.assert_close(count, torch.tensor([5.0, 3.0]))
    torch.testing.assert_close(total[1], logits[1, 2:].sum(0))


def test_a_carry_continues_the_running_mean() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 4)
    whole, _ = prefix_mean(logits, None)
    head, carry = prefix_mean(logits[:, :4], None)
    tail, _ = prefix_mean(logits[:, 4:], None, carry)
    torch.testing.assert_close(torch.cat([head, tail], 1), whole)


def test_router_rejects_an_unknown_pool() -> None:
    with pytest.raises(ValueError, match="pool must be one of"):
        TokenTopKRouter(dim=4, num_experts=2, top_k=1, pool="mean")


def _model(pool: str) -> MoLEModel:
    base, tok = load_base("tiny", seed=0)
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=["a", "b", "c"], r=4, lora_alpha=8.0,
                    target_modules=["q_proj", "v_proj"], top_k=1, pool=pool)  # fmt: skip
    model = MoLEModel(base=base, tokenizer=tok, spec=spec).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.bank.values():
            layer.lora_B.normal_(std=0.5)  # experts that differ, so a routing change shows in the logits
        for router in model.routers:
            router.gate.weight.normal_(std=1.0)
    return model


def test_cached_decoding_routes_as_a_full_forward_does() -> None:
    model = _model("prefix")
    ids = torch.tensor([[5, 17, 40, 9, 33], [0, 0, 12, 61, 7]])  # row 1 left-padded
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = model.generate(ids, mask, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = out.sequences  # (2, 8)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(full, full_mask).logits  # (2, 8, V)
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, logits[:, 4 + step], rtol=1e-4, atol=1e-4)


def test_prefix_pooling_changes_the_routing_of_later_tokens_only() -> None:
    token, prefix = _model("token"), _model("prefix")
    ids = torch.randint(3, 250, (1, 12))
    with torch.no_grad():
        a, b = token(ids), prefix(ids)
    torch.testing.assert_close(a.routing[0].weights[:, 0], b.routing[0].weights[:, 0])  # first token: its own
    assert any(not torch.equal(x.indices, y.indices) for x, y in zip(a.routing, b.routing, strict=True))
