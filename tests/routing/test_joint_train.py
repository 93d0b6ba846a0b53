"""mole.routing.train.joint_train: which parameters it trains, and the auxiliary losses it adds and optimises."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mole.nn.model import MoLEModel
from mole.routing.train import joint_train
from mole.sections import RouterConfig

ROWS = [{"prompt": f"Add {a} and {b}.\nAnswer:", "completion": str(a + b)} for a in range(3) for b in range(3)]


def _cfg(**kw: object) -> RouterConfig:
    return RouterConfig(**{"steps": 4, "batch_size": 4, "lr": 1e-2, "expert_lr": 1e-2, **kw})


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _same(params: list[torch.Tensor], before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_frozen_experts_stay_put_while_the_routers_train(make_mole: Callable[[], MoLEModel]) -> None:
    model = make_mole()
    experts, routers = _snapshot(model.expert_parameters()), _snapshot(model.router_parameters())
    base = {k: v.clone() for k, v in model.base.state_dict().items() if "lora" not in k}
    seen: list[tuple] = []
    hist = joint_train(model, ROWS, _cfg(freeze_experts=True), max_length=32, seed=0,
                       progress=lambda *a: seen.append(a))  # fmt: skip
    assert _same(model.expert_parameters(), experts)
    assert not any(p.requires_grad for p in model.expert_parameters())
    assert all(not torch.equal(p, b) for p, b in zip(model.router_parameters(), routers, strict=True))
    assert all(torch.equal(v, base[k]) for k, v in model.base.state_dict().items() if k in base)
    assert hist["steps"] == 4 and all(len(hist[k]) == 4 for k in ("loss", "lm_loss", "aux_loss", "z_loss"))
    assert hist["tokens"] > 0 and [s[:3] for s in seen] == [("joint", i, 4) for i in range(1, 5)]
    assert [s[3] for s in seen] == hist["loss"] and not model.training


def test_experts_train_unless_frozen_or_their_lr_is_zero(make_mole: Callable[[], MoLEModel]) -> None:
    model = make_mole()
    before = _snapshot(model.expert_parameters())
    joint_train(model, ROWS, _cfg(freeze_experts=False), max_length=32, seed=0)
    assert all(not torch.equal(p, b) for p, b in zip(model.expert_parameters(), before, strict=True))

    model = make_mole()
    routers = _snapshot(model.router_parameters())
    joint_train(model, ROWS, _cfg(freeze_experts=False, expert_lr=0.0), max_length=32, seed=0)
    assert _same(model.expert_parameters(), before) and not _same(model.router_parameters(), routers)


def test_the_aux_loss_is_added_with_its_coefficient_and_optimised(make_mole: Callable[[], MoLEModel]) -> None:
    runs = {}
    for coef in (0.0, 10.0):
        model = make_mole()
        runs[coef] = (joint_train(model, ROWS, _cfg(freeze_experts=True, aux_loss_coef=coef), max_length=32, seed=0),
                      _snapshot(model.router_parameters()))  # fmt: skip
    (off, off_routers), (on, on_routers) = runs[0.0], runs[10.0]
    # Step 1 sees the same model and batch: the same LM and aux losses, and loss = lm + coef * aux.
    assert off["lm_loss"][0] == on["lm_loss"][0] and off["aux_loss"][0] == on["aux_loss"][0] > 0
    assert off["loss"] == off["lm_loss"]  # no aux term at coefficient 0 (z_loss_coef is 0 too)
    for step in range(4):  # history values are rounded to 5 decimals; coef 10 scales aux's rounding error
        assert on["loss"][step] == pytest.approx(on["lm_loss"][step] + 10.0 * on["aux_loss"][step], abs=1e-4)
    # The aux term reaches the gradients: the routers end elsewhere and routing is more balanced (1.0 = uniform).
    assert not _same(on_routers, off_routers)
    assert on["aux_loss"][-1] < off["aux_loss"][-1] - 0.005


def test_the_z_loss_is_added_with_its_coefficient(make_mole: Callable[[], MoLEModel]) -> None:
    hist = joint_train(make_mole(), ROWS, _cfg(freeze_experts=True, aux_loss_coef=0.0, z_loss_coef=0.5),
                       max_length=32, seed=0)  # fmt: skip
    assert hist["z_loss"][0] > 0
    for step in range(4):
        assert hist["loss"][step] == pytest.approx(hist["lm_loss"][step] + 0.5 * hist["z_loss"][step], abs=2e-5)
