"""MoLELinear and the routers: invariants on tiny shapes (CPU, seeded by the autouse fixture)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mole.nn.layer import MoLELinear, RoutingState, choose_path
from mole.nn.router import (
    WARM_START_MARGIN,
    RouterOutput,
    TokenTopKRouter,
    forced_routing,
    load_balancing_loss,
    router_z_loss,
)


def _layer(
    d_in: int = 8, d_out: int = 6, num_experts: int = 4, r: int = 2, top_k: int = 2, path: str = "auto"
) -> tuple[MoLELinear, TokenTopKRouter, RoutingState]:
    state = RoutingState()
    base = nn.Linear(d_in, d_out)
    layer = MoLELinear(base_layer=base, num_experts=num_experts, r=r, scale=2.0, state=state, path=path)
    router = TokenTopKRouter(dim=d_in, num_experts=num_experts, top_k=top_k)
    return layer, router, state


def _randomise_experts(layer: MoLELinear) -> None:
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()


def _naive(layer: MoLELinear, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Reference: an explicit loop over experts, base + scale * sum_i w_i B_i A_i x."""
    y = layer.base_layer(x)
    for i in range(layer.num_experts):
        a, b = layer.expert(i)
        y = y + layer.scale * weights[..., i : i + 1] * (x @ a.T @ b.T)
    return y


def test_zero_init_b_gives_base_output_exactly() -> None:
    for path in ("dense", "sparse"):
        layer, router, state = _layer(path=path)
        x = torch.randn(2, 5, 8)
        state.output = router(x)
        assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router_weights_are_a_distribution_over_exactly_k(top_k: int) -> None:
    router = TokenTopKRouter(dim=8, num_experts=5, top_k=top_k)
    out = router(torch.randn(3, 7, 8))
    assert out.weights.shape == (3, 7, 5) and out.weights.dtype == torch.float32
    assert out.indices.shape == out.topk_weights.shape == (3, 7, top_k)
    assert (out.weights >= 0).all()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(3, 7))
    torch.testing.assert_close(out.topk_weights.sum(-1), torch.ones(3, 7))
    assert ((out.weights > 0).sum(-1) == top_k).all()
    assert torch.equal(out.weights.gather(-1, out.indices), out.topk_weights)


def test_router_validates_top_k() -> None:
    with pytest.raises(ValueError, match="top_k=5"):
        TokenTopKRouter(dim=4, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_k=0"):
        TokenTopKRouter(dim=4, num_experts=4, top_k=0)


def test_dense_path_matches_naive_reference() -> None:
    layer, router, state = _layer(path="dense")
    _randomise_experts(layer)
    x = torch.randn(2, 5, 8)
    state.output = router(x)
    torch.testing.assert_close(layer(x), _naive(layer, x, state.output.weights))


@pytest.mark.parametrize("tokens", [(1, 1), (2, 3), (4, 40)])
def test_sparse_path_matches_dense(tokens: tuple[int, int]) -> None:
    layer, router, state = _layer(d_in=12, d_out=10, num_experts=16, r=4, top_k=2, path="dense")
    _randomise_experts(layer)
    x = torch.randn(*tokens, 12)
    state.output = router(x)
    dense = layer(x)
    layer.path = "sparse"
    sparse = layer(x)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    layer.path = "dense"
    torch.testing.assert_close(layer(x), sparse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, _naive(layer, x, state.output.weights), rtol=1e-5, atol=1e-5)


def test_choose_path_rule() -> None:
    assert choose_path(16, 2, 64) == "sparse"
    assert choose_path(16, 2, 65) == "dense"
    assert choose_path(8, 2, 1) == "dense"
    assert choose_path(8, 1, 1) == "sparse"


def test_expert_round_trip_and_shape_errors() -> None:
    layer, _, _ = _layer(d_in=8, d_out=6, num_experts=3, r=2)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    layer.set_expert(1, a, b)
    a1, b1 = layer.expert(1)
    assert torch.equal(a1, a) and torch.equal(b1, b)
    assert torch.equal(layer.lora_A[2:4], a) and torch.equal(layer.lora_B[:, 2:4], b)
    assert not torch.equal(layer.expert(0)[0], a)
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        layer.set_expert(0, torch.randn(8, 2), b)
    with pytest.raises(ValueError, match=r"\(6, 2\)"):
        layer.set_expert(0, a, torch.randn(2, 6))
    with pytest.raises(ValueError, match="got 3"):
        layer.expert(3)
    assert "num_experts=3" in repr(layer)


def test_peft_style_init() -> None:
    layer, _, _ = _layer(d_in=16, num_experts=4, r=2)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    bound = 1 / math.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) on fan_in = d_in
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > 0
    assert layer.lora_A.device == layer.base_layer.weight.device
    assert layer.lora_A.dtype == layer.base_layer.weight.dtype


def test_only_experts_train_and_gradients_reach_router() -> None:
    layer, router, state = _layer(top_k=2)
    _randomise_experts(layer)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    x = torch.randn(2, 5, 8)
    for path in ("dense", "sparse"):
        layer.path = path
        layer.zero_grad(set_to_none=True)
        router.zero_grad(set_to_none=True)
        state.output = router(x)
        layer(x).square().sum().backward()  # no aux loss: the gate learns through the mixing weights
        assert layer.base_layer.weight.grad is None
        for p in (layer.lora_A, layer.lora_B, router.gate.weight, router.gate.bias):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_missing_routing_raises() -> None:
    layer, _, _ = _layer()
    with pytest.raises(RuntimeError, match="no routing"):
        layer(torch.randn(1, 2, 8))


def test_aux_loss_uniform_is_one_and_collapse_is_larger() -> None:
    e, k = 4, 2
    probs = torch.full((2, 4, e), 1 / e)
    # every expert chosen equally often: tokens cycle through pairs (0,1), (2,3)
    indices = torch.tensor([[0, 1], [2, 3]]).repeat(4, 1).view(2, 4, k)
    torch.testing.assert_close(load_balancing_loss(probs, indices, None, e), torch.tensor(1.0))
    collapsed_probs = torch.tensor([0.97, 0.01, 0.01, 0.01]).expand(2, 4, e)
    collapsed_idx = torch.tensor([0, 1]).expand(2, 4, k)
    assert load_balancing_loss(collapsed_probs, collapsed_idx, None, e) > 1.5


def test_z_loss_matches_manual() -> None:
    logits = torch.randn(2, 3, 5)
    manual = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(router_z_loss(logits, None), manual)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    manual_masked = torch.logsumexp(logits, -1).square()[mask.bool()].mean()
    torch.testing.assert_close(router_z_loss(logits, mask), manual_masked)
    router = TokenTopKRouter(dim=8, num_experts=5, top_k=2)
    out = router(torch.randn(2, 3, 8))
    torch.testing.assert_close(out.z_loss, torch.logsumexp(out.logits, -1).square().mean())


def test_mask_excludes_padding_from_losses() -> None:
    router = TokenTopKRouter(dim=8, num_experts=4, top_k=2)
    h = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[1, 2:] = 0
    h2 = h.clone()
    h2[~mask.bool()] = 100 * torch.randn(int((mask == 0).sum()), 8)
    a, b = router(h, mask), router(h2, mask)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    torch.testing.assert_close(a.z_loss, b.z_loss)
    assert not torch.allclose(router(h).aux_loss, router(h2).aux_loss)


def test_forced_routing_is_one_hot() -> None:
    out = forced_routing(torch.tensor([2, 0, 3]), seq_len=4, num_experts=5)
    assert isinstance(out, RouterOutput) and out.logits is None
    expected = torch.zeros(3, 4, 5)
    expected[0, :, 2] = expected[1, :, 0] = expected[2, :, 3] = 1
    assert torch.equal(out.weights, expected)
    assert out.indices.shape == out.topk_weights.shape == (3, 4, 1)
    assert torch.equal(out.topk_weights, torch.ones(3, 4, 1))
    assert out.aux_loss == 0 and out.z_loss == 0
    with pytest.raises(ValueError, match="expert_ids"):
        forced_routing(torch.tensor([5]), seq_len=2, num_experts=5)


def test_forced_routing_selects_one_expert_in_layer() -> None:
    layer, _, state = _layer(num_experts=8, path="sparse")
    _randomise_experts(layer)
    x = torch.randn(2, 3, 8)
    state.output = forced_routing(torch.tensor([5, 1]), seq_len=3, num_experts=8)
    y = layer(x)
    for row, i in enumerate((5, 1)):
        a, b = layer.expert(i)
        torch.testing.assert_close(y[row], layer.base_layer(x[row]) + layer.scale * x[row] @ a.T @ b.T)


def test_warm_start_routes_like_the_clusterer() -> None:
    e, d, n = 6, 16, 200
    centres = 3 * torch.randn(e, d)
    offset = 50 * torch.ones(d) + 20 * torch.randn(d)  # large shared offset: centring matters
    labels = torch.arange(e).repeat_interleave(torch.tensor([n, n // 2, n, 2 * n, n, n]))
    h = offset + centres[labels] + torch.randn(len(labels), d)
    means = torch.stack([h[labels == i].mean(0) for i in range(e)])
    router = TokenTopKRouter(dim=d, num_experts=e, top_k=2)
    router.warm_start(means, h.mean(0))
    out = router(h[None])
    accuracy = (out.indices[0, :, 0] == labels).float().mean()
    assert accuracy >= 0.95
    # auto temperature: the own expert leads the others by WARM_START_MARGIN logits on average at the means
    logits = router.gate(means)
    lead = (logits.diagonal()[:, None] - logits).sum() / (e * (e - 1))
    torch.testing.assert_close(lead, torch.tensor(WARM_START_MARGIN), rtol=1e-4, atol=1e-4)
    # the bias matters: rows alone (gate seeing un-centred h) route far worse
    with torch.no_grad():
        router.gate.bias.zero_()
    assert (router(h[None]).indices[0, :, 0] == labels).float().mean() < 0.8
    with pytest.raises(ValueError, match=r"\(6, 16\)"):
        router.warm_start(means[:3], h.mean(0))


@pytest.mark.parametrize("e", [2, 4])
def test_logistic_gate_separates_tokens_the_nearest_mean_rule_cannot(e: int) -> None:
    """Clusters that differ along a few quiet dimensions, under loud uninformative ones and a large offset: the
    nearest-mean gate is near chance per token, the logistic gate is not, and its softmax is the regression's."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mole.nn.logistic import SOLVER
    from mole.routing.warm_start import fit_gate

    g = torch.Generator().manual_seed(0)
    d, n = 24, 400

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(e).repeat(n)
        h = 40.0 + torch.randn(len(labels), d, generator=g)
        h[:, :4] += 4.0 * torch.nn.functional.one_hot(labels % 4, 4).float()  # the signal
        h[:, 8:] *= 12.0  # loud noise
        return h, labels

    h, labels = sample()
    test_h, test_labels = sample()
    means = torch.stack([h[labels == i].mean(0) for i in range(e)])
    nearest = TokenTopKRouter(dim=d, num_experts=e, top_k=1)
    nearest.warm_start(means, h.mean(0))
    logistic = TokenTopKRouter(dim=d, num_experts=e, top_k=1)
    train_acc = fit_gate(logistic, h.numpy(), labels.numpy(), c=1.0)

    def accuracy(router: TokenTopKRouter) -> float:
        return float((router(test_h[None]).indices[0, :, 0] == test_labels).float().mean())

    assert accuracy(logistic) >= 0.85 and train_acc >= 0.85, (accuracy(logistic), train_acc)
    assert accuracy(nearest) < accuracy(logistic) - 0.2, (accuracy(nearest), accuracy(logistic))
    scaler = StandardScaler().fit(h.numpy())
    clf = LogisticRegression(C=1.0, solver=SOLVER, max_iter=500, random_state=0)
    clf.fit(scaler.transform(h.numpy()), labels.numpy())
    expected = torch.from_numpy(clf.predict_proba(scaler.transform(test_h.numpy()))).float()
    torch.testing.assert_close(logistic(test_h[None]).logits[0].softmax(-1), expected, atol=1e-4, rtol=1e-3)


def test_bf16_and_autocast() -> None:
    layer, router, state = _layer(path="dense")
    _randomise_experts(layer)
    x = torch.randn(2, 5, 8)
    state.output = router(x)
    ref = layer(x)
    for path in ("dense", "sparse"):
        layer.path = path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state.output = router(x)
            assert state.output.logits.dtype == torch.float32  # gate stays fp32 under autocast
            y = layer(x)
        torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.2)
    layer.to(torch.bfloat16)  # bf16 base and bf16 experts, fp32 routing weights
    xb = x.bfloat16()
    state.output = router(xb)
    for path in ("dense", "sparse"):
        layer.path = path
        y = layer(xb)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.2)
    with torch.no_grad():  # fp32 experts on a bf16 base (peft's autocast_adapter_dtype)
        layer.lora_A.data = layer.lora_A.float()
        layer.lora_B.data = layer.lora_B.float()
    assert layer(xb).dtype == torch.bfloat16


def test_flattened_tokens_reuse_the_routing_and_mismatch_raises() -> None:
    for path in ("dense", "sparse"):
        layer, router, state = _layer(path=path)
        _randomise_experts(layer)
        x = torch.randn(2, 5, 8)
        state.output = router(x)
        torch.testing.assert_close(layer(x.reshape(10, 8)), layer(x).reshape(10, 6))
        with pytest.raises(RuntimeError, match="routing covers"):
            layer(torch.randn(2, 4, 8))
