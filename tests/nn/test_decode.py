"""Fast decode paths give the eager dense path's outputs: lazy routing, measured path choice, merged weights,
batched left-padded decoding with the KV cache, and compiled blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mole.base import load_base
from mole.nn import paths
from mole.nn.layer import MoLELinear, RoutingState
from mole.nn.model import MoLEModel
from mole.nn.router import RouterOutput, TokenTopKRouter, load_balancing_loss, router_z_loss
from mole.nn.spec import MoLESpec

E = 4


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to fp32 rounding, relative to the tensor's scale."""
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def _model(*, top_k: int = 2, pool: str = "token", shared: bool = False) -> MoLEModel:
    torch.manual_seed(0)
    base, tok = load_base("tiny", seed=0)
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=[f"e{i}" for i in range(E)], r=4,
                    lora_alpha=8.0, target_modules=["q_proj", "v_proj"], top_k=top_k, pool=pool,
                    shared="s" if shared else None)  # fmt: skip
    model = MoLEModel(base=base, tokenizer=tok, spec=spec).eval()
    with torch.no_grad():
        for layer in model.bank.values():
            layer.lora_B.normal_(std=0.5)  # experts that differ, so a routing change shows in the logits
        for router in model.routers:
            router.gate.weight.normal_(std=1.0)
    return model


def _layer(*, shared: bool, path: str = "dense") -> tuple[MoLELinear, TokenTopKRouter, RoutingState]:
    state = RoutingState()
    layer = MoLELinear(base_layer=nn.Linear(12, 10), num_experts=16, r=4, scale=1.5, state=state, path=path,
                       shared=shared)  # fmt: skip
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer, TokenTopKRouter(dim=12, num_experts=16, top_k=2), state


def _explicit(layer: MoLELinear, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The reference: base + scale * sum_i w_i B_i A_i x, one expert at a time (the shared slot with weight 1)."""
    with torch.no_grad():
        want = layer.base_layer(x)
        for i in range(layer.slots):
            a, b = layer.expert(i)
            weight = torch.ones_like(w[..., :1]) if i == layer.shared_index else w[..., i : i + 1]
            want = want + layer.scale * weight * (x @ a.T @ b.T)
    return want


def test_router_output_computes_weights_losses_and_mix_on_demand() -> None:
    router = TokenTopKRouter(dim=8, num_experts=5, top_k=2)
    h, mask = torch.randn(2, 6, 8), torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    out = router(h, mask)
    dense = torch.zeros(2, 6, 5).scatter(-1, out.indices, out.topk_weights)
    assert torch.equal(out.weights, dense)
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(out.logits.softmax(-1), out.indices, mask, 5))
    torch.testing.assert_close(out.z_loss, router_z_loss(out.logits, mask))
    mix = out.mix(slots=6, scale=2.0)  # a shared slot last: weight 1 for every token
    assert torch.equal(mix, torch.cat([2.0 * dense, torch.full((2, 6, 1), 2.0)], -1))
    assert out.mix(slots=6, scale=2.0) is mix  # computed once, shared by the block's modules
    with pytest.raises(ValueError, match="num_experts"):
        RouterOutput(None, out.indices, out.topk_weights, out.logits)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("tokens", [(1, 1), (3, 1), (2, 7), (3, 30)])
def test_fused_paths_match_the_explicit_sum_over_experts(shared: bool, tokens: tuple[int, int]) -> None:
    layer, router, state = _layer(shared=shared)
    x = torch.randn(*tokens, 12)
    with torch.no_grad():
        state.output = router(x)
        want = _explicit(layer, x, state.output.weights)
        for path in ("dense", "sparse", "auto"):
            layer.path = path
            _close(layer(x), want)
        layer.lora_B.mul_(-2.0)  # changed in place: every path follows the bank
        want = _explicit(layer, x, state.output.weights)
        for path in ("dense", "sparse", "auto"):
            layer.path = path
            _close(layer(x), want)
    layer.path = "dense"  # under autograd too (the general paths)
    state.output = router(x)
    _close(layer(x).detach(), _explicit(layer, x, state.output.weights.detach()))


@pytest.mark.parametrize("shared", [False, True])
def test_one_token_lean_path_follows_the_bank_and_autograd_and_dtypes(shared: bool) -> None:
    layer, router, state = _layer(shared=shared, path="auto")
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        state.output = routing = router(x)
        assert routing.lean and routing.tokens == 1
        _close(layer(x), _explicit(layer, x, routing.weights))
        layer.lora_B.mul_(-2.0)  # changed in place: the cached B^T blocks must follow
        _close(layer(x), _explicit(layer, x, routing.weights))
        chosen = int(routing.indices[0, 0, 0])
        a, b = layer.expert(chosen)
        layer.set_expert(chosen, a * 3.0, b + 1.0)
        _close(layer(x), _explicit(layer, x, routing.weights))
        layer.lora_A.data = layer.lora_A.data * 0.5  # new storage, same parameters
        _close(layer(x), _explicit(layer, x, routing.weights))
        layer.lora_B = nn.Parameter(layer.lora_B.detach() * 2.0)  # a new parameter
        _close(layer(x), _explicit(layer, x, routing.weights))
    state.output = routing = router(x)  # autograd on: not lean, gradients reach the chosen slots of the bank
    assert routing.tokens == 1 and not routing.lean
    y = layer(x)
    y.sum().backward()
    _close(y.detach(), _explicit(layer, x, routing.weights.detach()))
    used = routing.indices.reshape(-1).tolist() + ([layer.shared_index] if shared else [])
    grad_rows = layer.lora_A.grad.view(layer.slots, layer.r, -1).abs().sum((1, 2))
    assert sorted(grad_rows.nonzero()[:, 0].tolist()) == sorted(used)
    with torch.no_grad():  # a bf16 input to fp32 experts: the general sparse path, in the input's dtype
        xb = x.bfloat16()
        state.output = router(xb)
        want = _explicit(layer, xb.float(), state.output.weights)
        layer.base_layer.to(torch.bfloat16)
        y = layer(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.1)


def test_auto_path_is_measured_once_per_shape_and_only_without_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    paths.forget()
    timed: list[str] = []

    def fake_fastest(run, path, device_type):  # noqa: ANN001, ANN202 - stands in for the timer
        timed.append(path)
        return {"dense": 2.0, "sparse": 1.0}[path]

    monkeypatch.setattr(paths, "_fastest", fake_fastest)
    layer, router, state = _layer(shared=False, path="auto")
    x = torch.randn(1, 2, 12)
    state.output = routing = router(x)
    y = layer(x)  # autograd on: the rule, nothing measured
    assert timed == [] and paths.measured() == {}
    with torch.no_grad():
        layer(x)
        layer(x)
        assert timed == ["dense", "sparse"]  # once for this shape
        assert list(paths.measured().values()) == ["sparse"]
        big = torch.randn(2, 40, 12)  # more tokens than any sparse step: the rule, no measurement
        state.output = router(big)
        layer(big)
        one = torch.randn(1, 1, 12)  # one token, K <= E / 2: the sparse path without a measurement
        state.output = router(one)
        _close(layer(one), _explicit(layer, one, state.output.weights))
    assert timed == ["dense", "sparse"] and len(paths.measured()) == 1
    assert paths.pick(("any",), 1, 16, 2, lambda p: None) == "sparse"
    _close(y.detach(), _explicit(layer, x, routing.weights.detach()))
    paths.forget()
    assert paths.measured() == {}


@pytest.mark.parametrize("shared", [False, True])
def test_layer_merge_folds_any_weights_and_unmerge_restores_the_same_tensor(shared: bool) -> None:
    layer, _, state = _layer(shared=shared)
    x = torch.randn(2, 3, 12)
    mix = torch.zeros(16)
    mix[[2, 9]] = torch.tensor([0.3, 0.7])
    idx = torch.tensor([2, 9]).expand(2, 3, 2)
    state.output = RouterOutput(None, idx, mix[idx], None, torch.zeros(()), torch.zeros(()), num_experts=16)
    weight, before = layer.base_layer.weight, layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        want = layer(x)
        layer.merge(mix)
        assert layer.merged and layer.base_layer.weight is not weight
        _close(layer(x), want)
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge(mix)
        layer.unmerge()
    assert not layer.merged and layer.base_layer.weight is weight and torch.equal(weight, before)
    keys = set(layer.state_dict())
    layer.merge(mix)  # the kept weight is not registered as a parameter of the layer while merged
    assert set(layer.state_dict()) == keys and all(p is not weight for p in layer.parameters())
    layer.unmerge()
    with pytest.raises(ValueError, match=r"\(16,\)"):
        layer.merge(torch.ones(3))


@pytest.mark.parametrize("shared", [False, True])
def test_model_merged_equals_forced_routing_and_leaves_the_base_as_it_was(shared: bool) -> None:
    model = _model(shared=shared)
    ids = torch.randint(3, 250, (2, 9))
    weights = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    with torch.no_grad():
        want = model(ids, route=torch.tensor([1, 1])).logits
        with model.merged(torch.nn.functional.one_hot(torch.tensor(1), E).float()):
            got = model(ids).logits
        _close(got, want)
        assert not torch.allclose(model(ids, route=torch.tensor([2, 2])).logits, want)
    assert all(torch.equal(p, weights[n]) for n, p in model.base.named_parameters())
    assert not any(layer.merged for layer in model.bank.values())


def test_generate_merges_a_batch_routed_to_one_expert_with_the_same_output() -> None:
    model = _model()
    ids, mask = torch.tensor([[5, 17, 40, 9, 33], [0, 0, 12, 61, 7]]), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    merges: list[bool] = []
    model.bank[next(iter(model.bank))].register_forward_pre_hook(lambda m, a: merges.append(m.merged))
    kw = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    fast = model.generate(ids, mask, route=torch.tensor([3, 3]), **kw)
    assert merges and all(merges)
    merges.clear()
    model.merge_forced = False
    slow = model.generate(ids, mask, route=torch.tensor([3, 3]), **kw)
    assert merges and not any(merges)
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.logits, slow.logits, strict=True):
        _close(a, b)
    model.merge_forced = True
    merges.clear()
    model.generate(ids, mask, route=torch.tensor([3, 1]), max_new_tokens=2, do_sample=False)
    assert merges and not any(merges)  # two experts in the batch: nothing to merge


@pytest.mark.parametrize("pool", ["token", "prefix"])
def test_batched_left_padded_decode_equals_each_prompt_alone(pool: str) -> None:
    model = _model(pool=pool)
    prompts = [[5, 17, 40], [9, 33, 12, 61, 7, 88], [100, 4, 71, 23, 19, 54, 8, 240, 31]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = {"max_new_tokens": 5, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    batched = model.generate(ids, mask, **kw)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), **kw)
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, len(prompt) :]), row
        for a, b in zip(batched.logits, alone.logits, strict=True):
            torch.testing.assert_close(a[row], b[0], rtol=1e-4, atol=1e-4)


def _compiled_equals_eager(backend: str) -> None:
    eager, compiled = _model(), _model()
    compiled.compile_blocks(backend=backend)
    ids, mask = torch.tensor([[5, 17, 40, 9, 33], [0, 0, 12, 61, 7]]), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    kw = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    want, got = eager.generate(ids, mask, **kw), compiled.generate(ids, mask, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        _close(a, b)


def test_compiled_blocks_decode_as_the_eager_model_does() -> None:
    _compiled_equals_eager("aot_eager")  # dynamo's graphs through autograd's tracer: the capture, without codegen


@pytest.mark.slow
def test_inductor_compiled_blocks_decode_as_the_eager_model_does() -> None:
    _compiled_equals_eager("inductor")  # generated kernels (needs a C++ compiler on CPU; about a minute)
