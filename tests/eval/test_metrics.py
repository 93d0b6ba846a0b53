"""mole.eval.metrics: per-row NLL, loss summaries, routing statistics and eval.md, against hand computations."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from mole.base import load_base
from mole.data.tokenize import row_losses, row_nll
from mole.eval.metrics import entropy, loss_summary, render_markdown, routing_stats
from mole.nn.model import MoLEModel
from mole.nn.spec import MoLESpec

IGNORE = -100


def _hand_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """Next-token NLL summed per row, one token at a time, in float64."""
    nll, count = [], []
    for b in range(labels.shape[0]):
        total, n = 0.0, 0
        for t in range(1, labels.shape[1]):  # token t is predicted from position t - 1
            if labels[b, t] == IGNORE:
                continue
            row = logits[b, t - 1].double()
            total += float(torch.logsumexp(row, 0) - row[labels[b, t]])
            n += 1
        nll.append(total)
        count.append(n)
    return nll, count


def test_row_nll_matches_a_hand_computation() -> None:
    logits = torch.randn(3, 6, 11) * 3
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = IGNORE  # a prompt
    labels[1, 4] = IGNORE  # a hole
    labels[2, 1:] = IGNORE  # nothing scored (the first label is never a target)
    nll, count = row_nll(logits, labels)
    want_nll, want_count = _hand_nll(logits, labels)
    assert count.tolist() == want_count == [3, 4, 0]
    # float32 cross-entropy against a float64 reference.
    torch.testing.assert_close(nll.double(), torch.tensor(want_nll, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert nll[2] == 0


def test_row_nll_of_half_precision_logits_is_computed_in_float32() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    nll, _ = row_nll(logits.bfloat16(), labels)
    assert nll.dtype == torch.float32
    want, _ = _hand_nll(logits.bfloat16().float(), labels)  # the same (rounded) logits, in float64
    torch.testing.assert_close(nll.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_row_nll_equals_mole_model_score() -> None:
    """``row_nll`` of a MoLE model's full logits and ``MoLEModel.score`` (the LM head at labelled positions only) give
    the same sums."""
    base, tok = load_base("tiny", seed=0)
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=["expert_00", "expert_01"], r=2,
                    lora_alpha=4.0, target_modules=["q_proj"], top_k=1)  # fmt: skip
    model = MoLEModel(base=base, tokenizer=tok, spec=spec).eval()  # zero-B experts: the base's logits
    ids = torch.randint(3, 250, (2, 8))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    with torch.no_grad():
        nll, count = row_nll(model(ids).logits, labels)
        want_nll, want_count = model.score(ids, torch.ones_like(ids), labels)
    assert torch.equal(count, want_count) and count.tolist() == [5, 5]  # targets are tokens 1..7; 1 and 2 are prompt
    torch.testing.assert_close(nll, want_nll, rtol=1e-6, atol=1e-6)


def _labelled_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 10 and 7 tokens (right-padded), the first 4 of each a prompt (unlabelled)."""
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :4] = IGNORE
    return ids, mask, labels


def _head_rows(model: torch.nn.Module, fn: Any) -> tuple[Any, int]:
    """``fn()`` and the number of positions the LM head computed logits for."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[:-1].numel()))
    try:
        with torch.no_grad():
            return fn(), sum(seen)
    finally:
        handle.remove()


def test_row_losses_equal_row_nll_with_the_head_at_labelled_positions_only() -> None:
    """Plain and peft models: the same sums as ``row_nll`` of the full logits, from logits at the 6 + 3 labelled
    positions (not all 20); a soft-capped head takes the full forward and still gives the same sums."""
    from peft import LoraConfig, get_peft_model

    ids, mask, labels = _labelled_batch()
    base, _ = load_base("tiny", seed=0)
    torch.manual_seed(0)
    peft = get_peft_model(
        load_base("tiny", seed=0)[0], LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    for model in (base.eval(), peft.eval()):
        with torch.no_grad():
            want_nll, want_count = row_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
        (nll, count), rows = _head_rows(model, lambda m=model: row_losses(m, ids, mask, labels))
        assert rows == 9 and count.tolist() == want_count.tolist() == [6, 3]
        torch.testing.assert_close(nll, want_nll, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want_nll, _ = row_nll(base(input_ids=ids, attention_mask=mask).logits, labels)
    base.config.final_logit_softcapping = 30.0  # read by the check in labelled_losses only: the tiny Llama has no cap
    (nll, _), rows = _head_rows(base, lambda: row_losses(base, ids, mask, labels))
    assert rows == 20
    torch.testing.assert_close(nll, want_nll, rtol=1e-5, atol=1e-5)


def test_mole_score_and_routing_match_the_full_forward() -> None:
    """``MoLEModel.score`` (head at labelled positions) gives the full forward's sums and its routing, and
    ``MoLEModel.routing`` (no head at all) the same routing, with trained (non-zero) experts."""
    base, tok = load_base("tiny", seed=0)
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=["expert_00", "expert_01"], r=2,
                    lora_alpha=4.0, target_modules=["q_proj", "v_proj"], top_k=1)  # fmt: skip
    model = MoLEModel(base=base, tokenizer=tok, spec=spec).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.bank.values():
            layer.lora_B.normal_(std=0.5)
        for router in model.routers:
            router.gate.weight.normal_(std=1.0)
    ids, mask, labels = _labelled_batch()
    with torch.no_grad():
        full = model(ids, mask)
        want_nll, want_count = row_nll(full.logits, labels)
    routing: list[Any] = []
    (nll, count), rows = _head_rows(base, lambda: model.score(ids, mask, labels, routing=routing))
    assert rows == 9 and count.tolist() == want_count.tolist()
    torch.testing.assert_close(nll, want_nll, rtol=1e-5, atol=1e-5)
    only, rows = _head_rows(base, lambda: model.routing(ids, mask))
    assert rows == 0
    for got in (routing, only):
        assert len(got) == len(full.routing) == len(model.routers)
        for a, b in zip(got, full.routing, strict=True):
            assert torch.equal(a.indices, b.indices)
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert torch.cat([o.indices.flatten() for o in full.routing]).unique().numel() == 2  # both experts route tokens


def test_loss_summary() -> None:
    out = loss_summary(6.0, 3)
    assert out["loss"] == 2.0 and out["ppl"] == pytest.approx(math.exp(2.0), rel=1e-12)
    assert loss_summary(0.0, 0) == {"loss": None, "ppl": None}
    assert loss_summary(5.0, -1) == {"loss": None, "ppl": None}
    huge = loss_summary(1e6, 1)  # a diverged model: the loss is kept, the perplexity stays a finite float
    assert huge["loss"] == 1e6 and huge["ppl"] == pytest.approx(math.exp(700.0), rel=1e-12)


def test_entropy_in_nats() -> None:
    assert entropy([0.25] * 4) == pytest.approx(math.log(4), rel=1e-12)
    assert entropy([0.5, 0.5, 0.0]) == pytest.approx(math.log(2), rel=1e-12)  # zeros contribute nothing
    assert entropy(np.array([0.0, 1.0])) == 0.0
    p = [0.7, 0.2, 0.1]
    assert entropy(p) == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-12)


def test_routing_stats_by_hand() -> None:
    # 2 rows, 2 blocks, 3 experts; each row's top-k weights sum to 1 in every block.
    weights = np.array([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]],
                        [[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]], dtype=np.float32)  # fmt: skip
    # Row 0's top-1 (mean over blocks) is expert 0, row 1's is expert 2 (mean [0, .5, .75]).
    logits = np.array([[[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]],
                       [[0.0, 1.0, 0.5], [0.0, 0.0, 1.0]]], dtype=np.float32)  # fmt: skip
    stats = routing_stats(weights, logits, experts=[0, 1])
    assert stats["top1_agreement"] == 0.5
    # block 0: mean [.25, .5, .25]; block 1: [.5, 0, .5]; overall [.375, .25, .375]
    assert stats["utilization_per_layer"] == [[0.25, 0.5, 0.25], [0.5, 0.0, 0.5]]
    assert stats["utilization"] == [0.375, 0.25, 0.375]
    want_h = -(2 * 0.375 * math.log(0.375) + 0.25 * math.log(0.25))
    assert stats["entropy"] == pytest.approx(want_h, rel=1e-12)
    assert stats["normalized_entropy"] == pytest.approx(want_h / math.log(3), rel=1e-12)


def test_routing_stats_rounds_utilization_and_handles_one_expert() -> None:
    third = np.full((1, 1, 3), 1 / 3, dtype=np.float32)
    stats = routing_stats(third, np.zeros((1, 1, 3), dtype=np.float32), experts=[0])
    assert stats["utilization"] == [0.333333] * 3 and stats["normalized_entropy"] == pytest.approx(1.0, rel=1e-12)
    one = routing_stats(np.ones((2, 2, 1), dtype=np.float32), np.zeros((2, 2, 1), dtype=np.float32), experts=[0, 0])
    assert one["utilization"] == [1.0] and one["entropy"] == 0.0 and one["normalized_entropy"] == 1.0
    assert one["top1_agreement"] == 1.0


def _variant(loss: float | None, ppl: float | None, em: float | None, per_cluster: dict) -> dict:
    return {"loss": loss, "ppl": ppl, "exact_match": em, "per_cluster": per_cluster}


def _report() -> dict:
    variants = {  # not in display order, and one unknown variant
        "mole": _variant(1.23456789, 3.43685, 0.12345, {"0": {"loss": 1.1, "rows": 7}, "10": {"loss": 1.3, "rows": 2}}),
        "custom": _variant(2.0, 7.389, None, {"2": {"loss": 2.0, "rows": 5}}),
        "base": _variant(None, None, 0.5, {"0": {"loss": None, "rows": 7}}),
    }
    return {
        "variants": variants,
        "training": {"mole": {"steps": 12, "tokens": 1234567, "rank": 8}},
        "verdict": {"headline": "MoLE beats the base."},
        "clustering": {"k": 3, "silhouette": 0.123456, "ari": None},
        "routing": {
            "top1_agreement": 0.87654,
            "utilization": [0.5, 0.25, 0.25],
            "entropy": 1.0397208,
            "normalized_entropy": 0.9463946,
            "top_k": {"configured": 4, "used": 3},
        },
        "cost": {
            "trainable_params": 98304,
            "adapter_mb": 0.37512,
            "latency_ratio_vs_base": 1.23449,
            "base_ms": 10.04,
            "mole_ms": 12.36,
            "build_time": {
                "stages": {"prepare": 1.26, "train-experts": 30.04},
                "training": {"experts": 25.55, "router": 0.0},
                "total": 31.3,
                "training_fraction": 0.8163,
            },
        },
    }


def test_render_markdown_tables_and_rounding() -> None:
    lines = render_markdown(_report()).splitlines()
    assert lines[:4] == ["# Evaluation", "", "**MoLE beats the base.**", ""]
    assert lines[4].startswith("router.top_k is 4, but the build has 3 experts: each token went to all 3 (top_k 3).")
    header = "| variant | loss | ppl | exact match | steps | training tokens | rank per token |"
    table = lines[lines.index(header) + 2 :]
    assert table[:3] == [
        "| base | – | – | 0.500 | – | – | – |",  # VARIANT_ORDER first, then the others as given
        "| mole | 1.2346 | 3.44 | 0.123 | 12 | 1,234,567 | 8 |",
        "| custom | 2.0000 | 7.39 | – | – | – | – |",
    ]
    clusters = lines[lines.index("| cluster | rows | base | mole | custom |") + 2 :]
    assert clusters[:3] == [  # sorted as numbers: 10 after 2
        "| 0 | 7 | – | 1.1000 | – |",
        "| 2 | 5 | – | – | 2.0000 |",
        "| 10 | 2 | – | 1.3000 | – |",
    ]
    assert (
        "- routing: top-1 agreement with clusters 0.877; utilization [0.500, 0.250, 0.250]; entropy 1.040 nats "
        "(normalized 0.946)"
    ) in lines
    assert "- clustering: k=3, silhouette 0.1235, ARI –" in lines
    assert (
        "- cost: 98,304 trainable parameters, 0.375 MB of adapters, forward latency ×1.234 of the base "
        "(12.4 ms vs 10.0 ms)"
    ) in lines
    assert (
        "- build time (latest run of each stage): prepare 1.3 s, train-experts 30.0 s (total 31.3 s; 82% of it in "
        "training steps of the mixture's adapters; experts 25.6 s)"
    ) in lines
    assert lines[-6:] == ["![variants](variants.png)", "![loss curves](loss_curves.png)",
                          "![per-cluster loss](per_cluster_loss.png)", "![clusters](cluster_map.png)",
                          "![routing heatmap](routing_heatmap.png)",
                          "![per-token routing of a few eval rows](token_routing.png)"]  # fmt: skip


def test_render_markdown_says_when_k_is_one_and_omits_what_is_not_there() -> None:
    report = {"variants": {"base": _variant(2.5, 12.18, 0.0, {"0": {"loss": 2.5, "rows": 4}})}, "clustering": {"k": 1}}
    text = render_markdown(report)
    assert "k = 1: the clustering found no groups worth an expert" in text
    assert "router.top_k" not in text and "build time" not in text and "**" not in text
    assert "| base | 2.5000 | 12.18 | 0.000 | – | – | – |" in text.splitlines()
    assert "- cost: 0 trainable parameters, – MB of adapters" in text
