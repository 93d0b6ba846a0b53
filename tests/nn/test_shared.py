"""The shared expert (experts.shared): always-on slot of the fused bank, branched and residual experts, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mole.base import load_base
from mole.nn.layer import MoLELinear, RoutingState
from mole.nn.model import MoLEModel
from mole.nn.router import TokenTopKRouter
from mole.nn.spec import MoLESpec
from mole.sections import ExpertsConfig, LoraSection
from mole.training.lora import train_lora

E, R = 3, 4
LORA = LoraSection(r=R, lora_alpha=8.0, target_modules=["q_proj", "v_proj"])
ROWS = [{"id": f"r{i}", "prompt": f"Q{i}: add {i} and {i + 1}", "completion": str(2 * i + 1)} for i in range(8)]


def _trained_adapter(tmp_path: Path, name: str, *, steps: int = 3, **kw: object) -> Path:
    model, tok = load_base("tiny", seed=0)
    cfg = ExpertsConfig(lora=LORA, batch_size=4, max_length=32, lr=0.05, warmup_steps=0)
    train_lora(model, tok, ROWS, lora=LORA, cfg=cfg, steps=steps, out_dir=tmp_path / name, seed=1, fingerprint=name,
               **kw)  # fmt: skip
    return tmp_path / name


def _spec(shared: str | None) -> MoLESpec:
    ids = [f"expert_{i:02d}" for i in range(E)]
    return MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=ids, r=R, lora_alpha=8.0,
                    target_modules=["q_proj", "v_proj"], top_k=2, shared=shared)  # fmt: skip


def _ids() -> torch.Tensor:
    return torch.randint(3, 250, (2, 10))


def test_shared_with_zero_init_experts_gives_exactly_the_shared_adapters_output(tmp_path: Path) -> None:
    from peft import PeftModel

    shared = _trained_adapter(tmp_path, "shared")
    base, tok = load_base("tiny", seed=0)
    model = MoLEModel(base=base, tokenizer=tok, spec=_spec("shared")).eval()
    model.load_expert(model.shared_index, shared)  # routed experts keep their zero B
    with torch.no_grad():
        for router in model.routers:
            router.gate.weight.normal_(std=1.0)
    ref = PeftModel.from_pretrained(load_base("tiny", seed=0)[0], str(shared)).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_shared_slot_is_added_to_every_token_in_both_paths(path: str) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    state = RoutingState()
    layer = MoLELinear(base_layer=base, num_experts=E, r=2, scale=1.5, state=state, path=path, shared=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    router = TokenTopKRouter(dim=6, num_experts=E, top_k=2)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    layer, router = layer.double(), router.double()
    state.output = router(x)
    w = state.output.weights  # (B, T, E)
    want = base.double()(x)
    for i in range(E + 1):
        a, b = layer.expert(i)
        weight = torch.ones_like(w[..., :1]) if i == E else w[..., i : i + 1]
        want = want + 1.5 * weight * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), want)


def test_branched_expert_starts_equal_to_the_shared_one(tmp_path: Path) -> None:
    from mole.nn.adapters import read_adapter

    shared = _trained_adapter(tmp_path, "shared")
    seen: dict[str, torch.Tensor] = {}
    model, tok = load_base("tiny", seed=0)

    def grab(step: int, total: int, loss: float) -> None:  # after the first step: compare the update's origin
        seen["step"] = torch.tensor(step)

    cfg = ExpertsConfig(lora=LORA, batch_size=4, max_length=32, lr=1e-12, warmup_steps=0)  # a step that moves nothing
    train_lora(model, tok, ROWS, lora=LORA, cfg=cfg, steps=1, out_dir=tmp_path / "branch", seed=5, fingerprint="b",
               init_from=shared, progress=grab)  # fmt: skip
    _, start = read_adapter(shared)
    _, branch = read_adapter(tmp_path / "branch")
    assert seen["step"] == 1 and set(start) == set(branch)
    for key in start:
        torch.testing.assert_close(branch[key], start[key], rtol=0, atol=1e-9)


def test_residual_expert_trains_on_top_of_the_frozen_shared_adapter(tmp_path: Path) -> None:
    from mole.nn.adapters import read_adapter

    shared = _trained_adapter(tmp_path, "shared")
    before = read_adapter(shared)[1]
    resid = _trained_adapter(tmp_path, "resid", under=shared)
    _, tensors = read_adapter(resid)
    assert set(tensors) == set(before)  # saved alone: only its own weights, under peft's names
    assert all(torch.equal(before[k], read_adapter(shared)[1][k]) for k in before)  # the shared one is untouched
    assert any(not torch.equal(tensors[k], before[k]) for k in tensors)


def test_export_reproduces_each_experts_logits_through_peft(tmp_path: Path) -> None:
    """Every expert dir (and the shared one) of a saved MoLE loads with PeftModel.from_pretrained; a residual
    expert forced on every token, plus the shared adapter, gives the MoLE model's logits."""
    from peft import PeftModel

    shared = _trained_adapter(tmp_path, "shared")
    experts = [_trained_adapter(tmp_path, f"e{i}", steps=2 + i, under=shared) for i in range(E)]
    base, tok = load_base("tiny", seed=0)
    ids = [f"expert_{i:02d}" for i in range(E)]
    model = MoLEModel.from_experts(base=base, tokenizer=tok, expert_dirs=experts, expert_ids=ids,
                                   base_ref={"name": "tiny", "seed": 0}, top_k=2, shared_dir=shared).eval()  # fmt: skip
    saved = model.save_pretrained(tmp_path / "mole")
    loaded = MoLEModel.from_pretrained(saved).eval()
    ids = _ids()
    for i, eid in enumerate(loaded.spec.expert_ids):
        peft = PeftModel.from_pretrained(load_base("tiny", seed=0)[0], str(saved / "experts" / "shared"),
                                         adapter_name="shared")  # fmt: skip
        peft.load_adapter(str(saved / "experts" / eid), adapter_name="expert")
        peft.base_model.set_adapter(["shared", "expert"])
        with torch.no_grad():
            want = peft.eval()(input_ids=ids).logits
            got = loaded(ids, route=torch.full((ids.shape[0],), i)).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
