"""mole.nn.adapters: one expert as a standard peft LoRA adapter dir, written and read back bit-exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from mole.base import load_base
from mole.nn.adapters import CONFIG, WEIGHTS, adapter_keys, read_adapter, stable_config, write_adapter

R, ALPHA = 4, 8.0
TARGETS = ["v_proj", "q_proj"]  # unsorted on purpose: the written config must sort them


def _tiny_tensors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A (r, d_in), B (d_out, r)) for every q_proj / v_proj of ``model``."""
    return {
        name: (torch.randn(R, m.in_features), torch.randn(m.out_features, R))
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
    }


def test_adapter_keys_are_peft_safetensors_keys() -> None:
    assert adapter_keys("model.layers.0.self_attn.q_proj") == (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    )


def test_write_then_read_round_trips_bit_exactly(tmp_path: Path) -> None:
    a = torch.randn(8, R).T  # a non-contiguous (r, d_in) view: written as its values, not its storage
    b = torch.randn(6, R, requires_grad=True)  # a trainable tensor: written detached
    out = write_adapter(tmp_path / "e", {"blk.q_proj": (a, b)}, r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                        base_model="some/base")  # fmt: skip
    assert out == tmp_path / "e" and {p.name for p in out.iterdir()} == {CONFIG, WEIGHTS}
    config, tensors = read_adapter(out)
    key_a, key_b = adapter_keys("blk.q_proj")
    assert set(tensors) == {key_a, key_b}
    assert torch.equal(tensors[key_a], a) and torch.equal(tensors[key_b], b.detach())
    assert not tensors[key_b].requires_grad
    assert config["peft_type"] == "LORA" and config["r"] == R and config["lora_alpha"] == ALPHA
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["bias"] == "none"
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "some/base"


def test_peft_loads_the_written_adapter_with_our_weights(tmp_path: Path) -> None:
    base, _ = load_base("tiny", seed=0)
    tensors = _tiny_tensors(base)
    assert len(tensors) == 4  # 2 blocks x (q_proj, v_proj)
    write_adapter(tmp_path / "e", tensors, r=R, lora_alpha=ALPHA, target_modules=TARGETS)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "e"))
    seen = 0
    for name, (a, b) in tensors.items():
        module = peft.base_model.model.get_submodule(name)
        assert torch.equal(module.lora_A["default"].weight, a) and torch.equal(module.lora_B["default"].weight, b)
        assert module.scaling["default"] == ALPHA / R
        seen += 1
    assert seen == 4


def test_the_same_expert_written_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    tensors = {"m.q_proj": (torch.randn(R, 5), torch.randn(3, R))}
    write_adapter(tmp_path / "x", tensors, r=R, lora_alpha=ALPHA, target_modules=["v_proj", "q_proj"])
    write_adapter(tmp_path / "y", tensors, r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    for name in (CONFIG, WEIGHTS):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes(), name


def test_stable_config_sorts_target_modules_and_keys(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / CONFIG).write_text(json.dumps({"r": 4, "target_modules": ["v_proj", "k_proj", "q_proj"]}))
    (tmp_path / "b" / CONFIG).write_text(json.dumps({"target_modules": ["q_proj", "v_proj", "k_proj"], "r": 4}))
    stable_config(tmp_path / "a")
    stable_config(tmp_path / "b")
    text = (tmp_path / "a" / CONFIG).read_text()
    assert text == (tmp_path / "b" / CONFIG).read_text()
    assert json.loads(text) == {"r": 4, "target_modules": ["k_proj", "q_proj", "v_proj"]}
    # A regex target (a string, as peft allows) is kept as it is.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / CONFIG).write_text(json.dumps({"target_modules": ".*(v|q)_proj"}))
    stable_config(tmp_path / "c")
    assert json.loads((tmp_path / "c" / CONFIG).read_text()) == {"target_modules": ".*(v|q)_proj"}


@pytest.mark.parametrize("missing", [CONFIG, WEIGHTS])
def test_read_adapter_names_the_missing_file(tmp_path: Path, missing: str) -> None:
    write_adapter(tmp_path / "e", {"m.q_proj": (torch.zeros(R, 2), torch.zeros(2, R))}, r=R, lora_alpha=ALPHA,
                  target_modules=["q_proj"])  # fmt: skip
    (tmp_path / "e" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {missing}"):
        read_adapter(tmp_path / "e")


@pytest.mark.parametrize(
    "change",
    [{"use_dora": True}, {"rank_pattern": {"q_proj": 8}}, {"peft_type": "IA3"}],
    ids=["dora", "rank_pattern", "not_lora"],
)
def test_read_adapter_refuses_anything_but_plain_lora(tmp_path: Path, change: dict) -> None:
    write_adapter(tmp_path / "e", {"m.q_proj": (torch.zeros(R, 2), torch.zeros(2, R))}, r=R, lora_alpha=ALPHA,
                  target_modules=["q_proj"])  # fmt: skip
    assert read_adapter(tmp_path / "e")[0]["peft_type"] == "LORA"  # as written, it is accepted
    path = tmp_path / "e" / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match="only plain LoRA adapters"):
        read_adapter(tmp_path / "e")
