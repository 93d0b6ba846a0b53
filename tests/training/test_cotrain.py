"""Co-trained experts (experts.shared = cotrained): one run of mixed batches trains the shared LoRA and every expert."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mole.base import load_base
from mole.nn.model import MoLEModel
from mole.nn.spec import MoLESpec
from mole.sections import ExpertsConfig, LoraSection
from mole.training.cotrain import train_cotrained, write_adapter

E, R = 3, 4
LORA = LoraSection(r=R, lora_alpha=8.0, target_modules=["q_proj", "v_proj"])
ROWS = [{"id": f"r{i}", "prompt": f"Q{i}: add {i} and {i + 1}", "completion": str(2 * i + 1)} for i in range(9)]
CFG = ExpertsConfig(
    lora=LORA, batch_size=3, max_length=32, lr=0.05, warmup_steps=0, checkpoint_every=2, expert_lr_scale=1.0
)


def _run(tmp_path: Path, experts: list[int], *, steps: int, name: str = "run") -> tuple:
    model, tok = load_base("tiny", seed=0)
    return train_cotrained(model, tok, ROWS, experts, num_experts=E, lora=LORA, cfg=CFG, steps=steps,
                           ckpt=tmp_path / f"{name}.ckpt", seed=0, fingerprint=name)  # fmt: skip


def _moved(slot: dict, init: dict) -> bool:
    return any(not torch.equal(slot[m][1], init[m][1]) for m in slot)


def test_a_row_trains_the_shared_adapter_and_only_its_own_expert(tmp_path: Path) -> None:
    slots, state, _ = _run(tmp_path, [0] * 9, steps=2)
    for i in (1, 2):  # no rows: still at peft's init (B = 0)
        assert all(not b.any() for _, b in slots[i].values()), f"expert {i} moved without rows of its own"
    assert all(b.any() for _, b in slots[0].values()), "expert 0 got rows and should have moved"
    assert all(b.any() for _, b in slots[E].values()), "the shared adapter trains on every row"
    assert sorted(state["expert_losses"]) == ["0", "1", "2"] and len(state["losses"]) == 2
    assert all(len(v) == 2 for v in state["expert_losses"].values())  # one value per step, rows or not


def test_every_expert_with_rows_in_a_batch_is_stepped_by_it(tmp_path: Path) -> None:
    slots, state, _ = _run(tmp_path, [0, 1, 2] * 3, steps=3)  # one epoch: every expert's rows are in some batch
    for i in range(E + 1):
        assert all(b.any() for _, b in slots[i].values()), f"slot {i} was not stepped"
    assert sorted(state["expert_losses"]) == ["0", "1", "2"]


def test_a_resumed_run_ends_with_the_same_adapters(tmp_path: Path) -> None:
    experts = [i % E for i in range(9)]
    whole, _, _ = _run(tmp_path, experts, steps=4, name="whole")
    first, _, _ = _run(tmp_path, experts, steps=4, name="split")  # leaves split.ckpt at its last step
    assert (tmp_path / "split.ckpt").is_dir()
    again, state, _ = _run(tmp_path, experts, steps=4, name="split")  # resumes at step 4: nothing left to train
    assert state["step"] == 4
    for i in range(E + 1):
        for m in whole[i]:
            torch.testing.assert_close(again[i][m][1], whole[i][m][1], rtol=0, atol=0)


def test_exported_adapters_reproduce_the_oracle_mixture_through_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    experts = [i % E for i in range(9)]
    slots, state, peft_config = _run(tmp_path, experts, steps=3)
    dirs = {}
    for i in range(E + 1):
        metrics = {"loss": [0.0], "final_loss": 0.0, "steps": 3, "tokens": 1, "fingerprint": str(i)}
        dirs[i] = tmp_path / ("shared" if i == E else f"expert_{i:02d}")
        write_adapter(dirs[i], slots[i], peft_config, metrics)
    spec = MoLESpec(base_model={"name": "tiny", "seed": 0}, expert_ids=[f"expert_{i:02d}" for i in range(E)], r=R,
                    lora_alpha=8.0, target_modules=["q_proj", "v_proj"], top_k=1, shared="shared")  # fmt: skip
    base, tok = load_base("tiny", seed=0)
    mole = MoLEModel(base=base, tokenizer=tok, spec=spec).eval()
    for i in range(E + 1):
        mole.load_expert(i, dirs[i])
    ids = torch.randint(3, 250, (1, 10))
    for i in range(E):
        ref = PeftModel.from_pretrained(load_base("tiny", seed=0)[0], str(dirs[E]), adapter_name="shared")
        ref.load_adapter(str(dirs[i]), adapter_name="expert")
        ref.base_model.set_adapter(["shared", "expert"])  # both active: their deltas add up, as in the bank
        with torch.no_grad():
            want = ref.eval()(input_ids=ids).logits
            got = mole(ids, route=torch.tensor([i])).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_expert_lr_scale_scales_the_experts_step_only(tmp_path: Path) -> None:
    experts = [i % E for i in range(9)]
    full, _, _ = _run(tmp_path, experts, steps=1, name="full")
    model, tok = load_base("tiny", seed=0)
    half_cfg = CFG.model_copy(update={"expert_lr_scale": 0.5})
    half, _, _ = train_cotrained(model, tok, ROWS, experts, num_experts=E, lora=LORA, cfg=half_cfg, steps=1,
                                 ckpt=tmp_path / "half.ckpt", seed=0, fingerprint="half")  # fmt: skip
    for m in full[E]:  # the shared adapter: the same first step
        torch.testing.assert_close(half[E][m][1], full[E][m][1], rtol=0, atol=0)
    for i in range(E):  # B starts at 0, so after one step it is the step itself
        for m in full[i]:
            torch.testing.assert_close(half[i][m][1], 0.5 * full[i][m][1], rtol=1e-6, atol=1e-7)


def test_first_tokens_train_the_expert_given_for_them(tmp_path: Path) -> None:
    """With ``first`` (experts.first_gate) a row's first token trains that expert: here expert 1, which has no rows."""
    model, tok = load_base("tiny", seed=0)
    slots, _, _ = train_cotrained(model, tok, ROWS, [0] * 9, num_experts=E, lora=LORA, cfg=CFG, steps=2,
                                  ckpt=tmp_path / "first.ckpt", seed=0, fingerprint="first", first=[1] * 9)  # fmt: skip
    # (its v_proj: later tokens read the first token's values; a last block's q_proj there reaches no label)
    assert all(b.any() for m, (_, b) in slots[1].items() if "v_proj" in m), "expert 1 computed the first tokens"
    assert all(not b.any() for _, b in slots[2].values()), "expert 2 computed nothing"
    assert all(b.any() for _, b in slots[0].values())


def test_experts_first_gate_changes_the_fingerprints_only_when_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off (the default) it leaves every adapter's fingerprint as builds before the option made it; on, the co-trained
    run is new (and depends on the gate's fit, router.warm_start_c), so are its adapters (the run is their upstream),
    and adapters outside the run (an expert trained alone, the baseline) stay as they were."""
    from mole.config import load_config
    from mole.training.cotrain import run_fingerprint
    from mole.training.lora import adapter_fingerprint

    def prints(*overrides: str) -> tuple[str, str]:
        cfg = load_config(None, preset="tiny", overrides=list(overrides))
        return (run_fingerprint(cfg, {0: ["a"], 1: ["b"]}),
                adapter_fingerprint(cfg, kind="expert", seed=1, steps=3, row_ids=["a"]))  # fmt: skip

    off, on = prints(), prints("experts.first_gate=true")
    assert off[0] != on[0] and off[1] == on[1]
    assert prints("experts.first_gate=true", "router.warm_start_c=0.5")[0] != on[0]
    assert prints("router.warm_start_c=0.5") == off  # off: the gate's fit plays no part in the experts
    # Off, the fingerprints are those of a config without the option (as before it): its dump made to lack it.
    dump = ExpertsConfig.model_dump

    def without(self: ExpertsConfig, **kw: object) -> dict:
        return {k: v for k, v in dump(self, **kw).items() if k != "first_gate"}

    monkeypatch.setattr(ExpertsConfig, "model_dump", without)
    assert prints() == off
