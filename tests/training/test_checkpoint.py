"""mole.training.checkpoint: save -> resume gives the same run back; checkpoints of other runs and stale temps go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mole.training.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    remove_stale_temps,
    resume,
    save_checkpoint,
)

CPU = torch.device("cpu")
TOTAL = 10


def _params() -> dict[str, nn.Parameter]:
    return {"blk.lora_A": nn.Parameter(torch.randn(3, 5)), "blk.lora_B": nn.Parameter(torch.randn(4, 3))}


def _step(params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> None:
    """One AdamW step on a loss that also draws from the RNG (as dropout does)."""
    a, b = params["blk.lora_A"], params["blk.lora_B"]
    x = torch.randn(2, 5)
    loss = (torch.nn.functional.dropout(x @ a.T, p=0.5) @ b.T).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _trained(ckpt: Path, steps: int = 2) -> tuple[dict[str, nn.Parameter], torch.optim.Optimizer, dict]:
    params = _params()
    opt = torch.optim.AdamW(params.values(), lr=0.1, weight_decay=0.01)
    for _ in range(steps):
        _step(params, opt)
    state = {"step": steps, "total_steps": TOTAL, "losses": [1.5, 1.25], "tokens": 40, "seconds": 0.5,
             "fingerprint": "fp"}  # fmt: skip
    save_checkpoint(ckpt, adapter=params, optimizer=opt, device=CPU, state=state)
    return params, opt, state


def test_checkpoint_dir_is_a_sibling() -> None:
    assert checkpoint_dir(Path("/w/artifacts/experts/expert_00")) == Path("/w/artifacts/experts/expert_00.ckpt")


def test_resume_continues_exactly_where_the_run_stopped(tmp_path: Path) -> None:
    ckpt = tmp_path / "e.ckpt"
    params, opt, state = _trained(ckpt)
    assert {p.name for p in ckpt.iterdir()} == {"adapter.safetensors", "optimizer.safetensors", "state.json"}
    # The uninterrupted run takes a third step.
    _step(params, opt)
    want = {n: p.detach().clone() for n, p in params.items()}

    # A fresh process: other weights, an empty optimizer, another RNG position.
    torch.manual_seed(123)
    fresh = _params()
    fresh_opt = torch.optim.AdamW(fresh.values(), lr=0.1, weight_decay=0.01)
    got = resume(ckpt, params=fresh, optimizer=fresh_opt, device=CPU, fingerprint="fp", total_steps=TOTAL)
    assert got == state
    step_state = {int(fresh_opt.state[p]["step"]) for p in fresh.values()}
    assert step_state == {2}
    _step(fresh, fresh_opt)  # same weights, moments, step count and dropout draws: the same third step
    for name, p in fresh.items():
        torch.testing.assert_close(p.detach(), want[name], rtol=0, atol=0)


def test_loaded_checkpoint_holds_the_saved_tensors(tmp_path: Path) -> None:
    ckpt = tmp_path / "e.ckpt"
    params, opt, state = _trained(ckpt)
    loaded = load_checkpoint(ckpt, fingerprint="fp", total_steps=TOTAL)
    assert loaded is not None and loaded.step == 2 and loaded.state == state
    assert set(loaded.adapter) == set(params)
    assert all(torch.equal(loaded.adapter[n], p.detach()) for n, p in params.items())
    for name, p in params.items():
        assert torch.equal(loaded.optimizer[f"exp_avg/{name}"], opt.state[p]["exp_avg"])
        assert torch.equal(loaded.optimizer[f"exp_avg_sq/{name}"], opt.state[p]["exp_avg_sq"])
        assert float(loaded.optimizer[f"step/{name}"]) == 2.0
    assert "rng/cpu" in loaded.optimizer and "rng/cuda" not in loaded.optimizer


@pytest.mark.parametrize(("fingerprint", "total_steps"), [("other", TOTAL), ("fp", TOTAL + 1)])
def test_checkpoint_of_another_run_is_refused_and_deleted(tmp_path: Path, fingerprint: str, total_steps: int) -> None:
    ckpt = tmp_path / "e.ckpt"
    _trained(ckpt)
    fresh = _params()
    before = {n: p.detach().clone() for n, p in fresh.items()}
    opt = torch.optim.AdamW(fresh.values(), lr=0.1)
    got = resume(ckpt, params=fresh, optimizer=opt, device=CPU, fingerprint=fingerprint, total_steps=total_steps)
    assert got is None
    assert not ckpt.exists()
    assert all(torch.equal(p, before[n]) for n, p in fresh.items()) and not opt.state


def test_checkpoint_with_other_tensors_is_refused_and_deleted(tmp_path: Path) -> None:
    ckpt = tmp_path / "e.ckpt"
    _trained(ckpt)
    other = {"blk.lora_A": nn.Parameter(torch.randn(3, 5)), "blk2.lora_A": nn.Parameter(torch.randn(3, 5))}
    before = {n: p.detach().clone() for n, p in other.items()}
    opt = torch.optim.AdamW(other.values(), lr=0.1)
    assert resume(ckpt, params=other, optimizer=opt, device=CPU, fingerprint="fp", total_steps=TOTAL) is None
    assert not ckpt.exists() and all(torch.equal(p, before[n]) for n, p in other.items())


@pytest.mark.parametrize("damage", ["state.json", "adapter.safetensors", "missing optimizer"])
def test_unreadable_checkpoint_is_deleted(tmp_path: Path, damage: str) -> None:
    ckpt = tmp_path / "e.ckpt"
    _trained(ckpt)
    if damage == "missing optimizer":
        (ckpt / "optimizer.safetensors").unlink()
    else:
        data = (ckpt / damage).read_bytes()
        (ckpt / damage).write_bytes(data[: len(data) // 2])  # truncated by a kill
    assert load_checkpoint(ckpt, fingerprint="fp", total_steps=TOTAL) is None
    assert not ckpt.exists()


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "none.ckpt", fingerprint="fp", total_steps=TOTAL) is None


def test_saving_again_replaces_the_checkpoint_atomically(tmp_path: Path) -> None:
    ckpt = tmp_path / "e.ckpt"
    params, opt, state = _trained(ckpt)
    _step(params, opt)
    save_checkpoint(ckpt, adapter=params, optimizer=opt, device=CPU, state={**state, "step": 3})
    loaded = load_checkpoint(ckpt, fingerprint="fp", total_steps=TOTAL)
    assert loaded is not None and loaded.step == 3
    assert all(torch.equal(loaded.adapter[n], p.detach()) for n, p in params.items())
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ckpt"]  # no temp or previous version left


def test_remove_stale_temps_removes_only_the_outputs_own_temps(tmp_path: Path) -> None:
    out = tmp_path / "expert_00"
    out.mkdir()
    checkpoint_dir(out).mkdir()
    own = [tmp_path / ".mole-tmp-expert_00.a1b2", tmp_path / ".mole-tmp-expert_00.ckpt.c3d4"]  # output, checkpoint
    own[0].mkdir()
    (own[0] / "adapter_model.safetensors").write_bytes(b"half")
    own[1].write_bytes(b"half")
    others = [tmp_path / ".mole-tmp-expert_01.e5f6", tmp_path / ".mole-tmp-expert_001.x", tmp_path / "keep.txt"]
    for p in others:
        p.write_text("x")
    remove_stale_temps(out)
    assert not any(p.exists() for p in own)
    assert all(p.exists() for p in others) and out.is_dir() and checkpoint_dir(out).is_dir()
    remove_stale_temps(tmp_path / "missing" / "expert_00")  # a parent not made yet: nothing to do, no error


def test_remove_stale_temps_puts_back_a_checkpoint_a_killed_swap_left_aside(tmp_path: Path) -> None:
    """Killed between atomic_dir's two renames: the last checkpoint waits as .old; it is restored, not deleted."""
    out = tmp_path / "expert_00"
    aside = tmp_path / ".mole-tmp-expert_00.ckpt.old"
    aside.mkdir()
    (aside / "state.json").write_text('{"step": 4}')
    remove_stale_temps(out)
    assert (checkpoint_dir(out) / "state.json").read_text() == '{"step": 4}' and not aside.exists()
