"""mole.nn.packed_bank: peft's initial adapters, and the expert bank swapped into a base for one packed run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from mole.base import load_base
from mole.nn.adapters import write_adapter
from mole.nn.layer import MoLELinear
from mole.nn.packed_bank import PackedBank, peft_init
from mole.sections import LoraSection

E, R = 2, 4
LORA = LoraSection(r=R, lora_alpha=8.0, target_modules=["q_proj", "v_proj"])
MODULES = [f"model.layers.{b}.self_attn.{m}" for b in range(2) for m in ("q_proj", "v_proj")]


def _ids() -> torch.Tensor:
    return torch.randint(3, 250, (2, 9))


def _random_expert(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name in MODULES:
        m = model.get_submodule(name)
        out[name] = (torch.randn(R, m.in_features) * 0.3, torch.randn(m.out_features, R) * 0.3)
    return out


def test_peft_init_gives_peft_start_and_the_model_back_as_it_was() -> None:
    model, _ = load_base("tiny", seed=0)
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag the caller set must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tensors, config = peft_init(model, LORA, seed=7)
    assert list(tensors) == MODULES  # peft's visiting order
    for name, (a, b) in tensors.items():
        d_out, d_in = model.get_submodule(name).weight.shape
        assert a.shape == (R, d_in) and b.shape == (d_out, R)
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) == a.numel()  # peft: random A, zero B
    assert config.r == R and config.lora_alpha == 8.0 and set(config.target_modules) == {"q_proj", "v_proj"}
    # The base is unchanged: no LoRA modules left, same weights, flags and (eval) mode.
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in MODULES)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training


def test_peft_init_is_seeded() -> None:
    model, _ = load_base("tiny", seed=0)
    first, _ = peft_init(model, LORA, seed=3)
    again, _ = peft_init(model, LORA, seed=3)
    other, _ = peft_init(model, LORA, seed=4)
    assert all(torch.equal(first[n][0], again[n][0]) for n in MODULES)
    assert not any(torch.equal(first[n][0], other[n][0]) for n in MODULES)


def test_bank_is_swapped_in_and_the_base_restored_on_exit() -> None:
    model, _ = load_base("tiny", seed=0)
    originals = {n: model.get_submodule(n) for n in MODULES}
    model.lm_head.weight.requires_grad_(False)  # tied with embed_tokens: both become frozen flags
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not model.training
    with PackedBank(model, LORA, num_experts=E, modules=MODULES) as bank:
        for name in MODULES:
            layer = model.get_submodule(name)
            assert isinstance(layer, MoLELinear) and bank.layers[name] is layer
            assert layer.base_layer is originals[name] and layer.num_experts == E and layer.r == R
            assert layer.scale == LORA.scale and layer.state is bank.state
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {f"{n}.{p}" for n in MODULES for p in ("lora_A", "lora_B")}
        assert model.training
    assert all(model.get_submodule(n) is originals[n] for n in MODULES)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    assert bank.layers == {} and bank.state.output is None


def test_bank_refuses_a_module_that_is_not_linear_and_leaves_the_model_as_it_was() -> None:
    model, _ = load_base("tiny", seed=0)
    model.train(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    first = "model.layers.0.self_attn.q_proj"
    bank = PackedBank(model, LORA, num_experts=E, modules=[first, "model.layers.0.input_layernorm"])
    with pytest.raises(TypeError, match=r"model\.layers\.0\.input_layernorm is LlamaRMSNorm"), bank:
        pass
    assert type(model.get_submodule(first)) is torch.nn.Linear  # not left swapped for a bank layer
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training


def test_routed_sequence_gets_exactly_its_experts_peft_output(tmp_path: Path) -> None:
    """Sequence b routed to expert i gives the logits of peft with expert i's adapter."""
    model, _ = load_base("tiny", seed=0)
    experts = [_random_expert(model) for _ in range(E)]
    ids = _ids()
    with torch.no_grad(), PackedBank(model, LORA, num_experts=E, modules=MODULES) as bank:
        for i, tensors in enumerate(experts):
            bank.set_expert(i, tensors)
        bank.route(torch.tensor([1, 0]), seq_len=ids.shape[1])
        got = model(input_ids=ids).logits
    for b, i in enumerate([1, 0]):
        write_adapter(
            tmp_path / f"e{i}", experts[i], r=R, lora_alpha=LORA.lora_alpha, target_modules=["q_proj", "v_proj"]
        )
        ref = PeftModel.from_pretrained(load_base("tiny", seed=0)[0], str(tmp_path / f"e{i}")).eval()
        with torch.no_grad():
            want = ref(input_ids=ids[b : b + 1]).logits[0]
        torch.testing.assert_close(got[b], want)
    with torch.no_grad():  # and the experts really act: the base alone differs
        assert not torch.allclose(got, model(input_ids=ids).logits, atol=1e-3)


def test_shared_slot_is_added_under_every_expert() -> None:
    """A bank with a shared slot S and a zero expert gives what a bank holding S as that expert gives."""
    model, _ = load_base("tiny", seed=0)
    shared, zero = _random_expert(model), {n: (a, torch.zeros_like(b)) for n, (a, b) in _random_expert(model).items()}
    ids = _ids()
    route = torch.tensor([0, 1])
    with torch.no_grad(), PackedBank(model, LORA, num_experts=E, modules=MODULES, shared=True) as bank:
        assert all(layer.shared_index == E for layer in bank.layers.values())
        bank.set_shared(shared)
        for i in range(E):
            bank.set_expert(i, zero)
        bank.route(route, seq_len=ids.shape[1])
        got = model(input_ids=ids).logits
    with torch.no_grad(), PackedBank(model, LORA, num_experts=E, modules=MODULES) as bank:
        for i in range(E):
            bank.set_expert(i, shared)
        bank.route(route, seq_len=ids.shape[1])
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def test_expert_views_share_storage_and_get_their_slice_of_the_gradients() -> None:
    model, tok = load_base("tiny", seed=0)
    ids = _ids()
    with PackedBank(model, LORA, num_experts=E, modules=MODULES) as bank:
        for i in range(E):
            bank.set_expert(i, _random_expert(model))
        views = [bank.expert_views(i) for i in range(E)]
        q = "model.layers.0.self_attn.q_proj"
        assert set(views[0]) == {f"base_model.model.{n}.lora_{p}.default.weight" for n in MODULES for p in "AB"}
        layer = bank.layers[q]
        a1, b1 = layer.expert(1)
        assert torch.equal(views[1][f"base_model.model.{q}.lora_A.default.weight"], a1)
        assert torch.equal(views[1][f"base_model.model.{q}.lora_B.default.weight"], b1)

        bank.route(torch.tensor([1, 1]), seq_len=ids.shape[1])  # only expert 1 is used
        model(input_ids=ids, labels=ids).loss.backward()
        for i in range(E):
            bank.attach_grads(i, views[i])
        assert all(torch.count_nonzero(v.grad) == 0 for v in views[0].values())  # unused: zero gradients
        assert all(torch.count_nonzero(v.grad) > 0 for v in views[1].values())
        torch.testing.assert_close(views[1][f"base_model.model.{q}.lora_A.default.weight"].grad,
                                   layer.lora_A.grad[R : 2 * R], rtol=0, atol=0)  # fmt: skip
        torch.testing.assert_close(views[1][f"base_model.model.{q}.lora_B.default.weight"].grad,
                                   layer.lora_B.grad[:, R : 2 * R], rtol=0, atol=0)  # fmt: skip

        # An optimizer over expert 1's views steps the bank in place and leaves expert 0 alone.
        a0, b0 = layer.expert(0)
        torch.optim.SGD(list(views[1].values()), lr=0.1).step()
        a1_new, b1_new = layer.expert(1)
        assert not torch.equal(a1_new, a1) and not torch.equal(b1_new, b1)
        assert torch.equal(layer.expert(0)[0], a0) and torch.equal(layer.expert(0)[1], b0)

        bank.zero_grad()
        assert all(lay.lora_A.grad is None and lay.lora_B.grad is None for lay in bank.layers.values())
        bank.attach_grads(1, views[1])  # no bank gradient: zeros of each view's shape
        assert all(v.grad.shape == v.shape and torch.count_nonzero(v.grad) == 0 for v in views[1].values())


@pytest.mark.parametrize("i", [-1, E])
def test_expert_index_out_of_range_is_refused(i: int) -> None:
    model, _ = load_base("tiny", seed=0)
    bank = PackedBank(model, LORA, num_experts=E, modules=MODULES)
    with bank, pytest.raises(ValueError, match=rf"expert index must be in \[0, {E}\), got {i}"):
        bank.expert_views(i)


def test_half_precision_base_gets_float32_experts() -> None:
    model, _ = load_base("tiny", seed=0, dtype="bfloat16")
    with PackedBank(model, LORA, num_experts=E, modules=MODULES) as bank:
        for layer in bank.layers.values():
            assert layer.base_layer.weight.dtype == torch.bfloat16
            assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
