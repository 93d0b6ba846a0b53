"""Packed expert training: the same adapters as separate train_lora runs on the same batches, resumable, on the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from mole import stages
from mole.base import load_base
from mole.config import load_config
from mole.nn.layer import MoLELinear
from mole.sections import ExpertsConfig, LoraSection
from mole.training.checkpoint import checkpoint_dir
from mole.training.experts import run_train_experts
from mole.training.lora import is_finished, train_lora
from mole.training.packed import PackedExpert, train_packed

# Two experts with different data, lengths, seeds and label counts (prompt/completion vs text rows), so that a
# shared loss normalisation, a shared clip norm or shared batches would all show up in the weights.
ROWS = {
    "a": [{"prompt": f"Add {a} and {b}.\nAnswer:", "completion": str(a + b)} for a in range(3) for b in range(3)],
    "b": [{"text": f"The {w} is {c}, on mat {n}."} for w, c in (("cat", "red"), ("ox", "tan")) for n in range(3)],
}
SEEDS = {"a": 3, "b": 4}
STEPS = 5
LORA = LoraSection(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
# grad_clip is small enough that every step clips: per-expert clipping is exercised, not bypassed.
CFG = ExpertsConfig(batch_size=3, max_length=48, lr=1e-2, warmup_steps=2, grad_clip=0.05, weight_decay=0.01,
                    checkpoint_every=2)  # fmt: skip
# fp32; packed and separate runs differ only in float summation order (measured max |diff| ~2e-7, while dropping
# the per-expert clipping moves weights by ~4e-3).
TOL = {"rtol": 1e-4, "atol": 1e-5}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}


def _adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "adapter_model.safetensors"))


def _experts(root: Path) -> list[PackedExpert]:
    return [PackedExpert(n, ROWS[n], root / n, SEEDS[n], STEPS, f"fp-{n}") for n in ROWS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both experts trained separately (train_lora) and packed, on the same base object."""
    root = tmp_path_factory.mktemp("packed")
    model, tok = load_base("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for e in _experts(root / "separate"):
        train_lora(model, tok, e.rows, lora=LORA, cfg=CFG, steps=e.steps, out_dir=e.out_dir, seed=e.seed,
                   fingerprint=e.fingerprint)  # fmt: skip
    # rows_per_forward=2: forwards mix the two experts' sequences, and a step spans several forwards.
    metrics = train_packed(model, tok, _experts(root / "packed"), lora=LORA, cfg=CFG, rows_per_forward=2)
    return {"root": root, "model": model, "tok": tok, "before": before, "flags": flags, "metrics": metrics}


def test_packed_gives_the_adapters_of_separate_runs(trained: dict) -> None:
    root = trained["root"]
    for name in ROWS:
        sep, pk = _adapter(root / "separate" / name), _adapter(root / "packed" / name)
        assert sep.keys() == pk.keys() and len(sep) == 2 * 3 * 2  # 2 blocks x 3 modules x (A, B)
        for key in sep:
            torch.testing.assert_close(pk[key], sep[key], **TOL, msg=lambda m, k=f"{name} {key}": f"{k}: {m}")
        assert max(t.abs().max() for k, t in pk.items() if "lora_B" in k) > 100 * TOL["atol"]  # B moved off zero
        sep_m = json.loads((root / "separate" / name / "train_metrics.json").read_text())
        pk_m = json.loads((root / "packed" / name / "train_metrics.json").read_text())
        assert pk_m == trained["metrics"][name] and set(pk_m) == set(sep_m) | {"mode"} and pk_m["mode"] == "packed"
        for key in ("steps", "rows", "tokens", "fingerprint", "seed", "r", "target_modules", "resumed_from"):
            assert pk_m[key] == sep_m[key], key
        torch.testing.assert_close(torch.tensor(pk_m["loss"]), torch.tensor(sep_m["loss"]), **TOL)
        configs = [json.loads((root / d / name / "adapter_config.json").read_text()) for d in ("separate", "packed")]
        assert configs[0] == configs[1]
        assert is_finished(root / "packed" / name, f"fp-{name}") and not checkpoint_dir(root / "packed" / name).exists()
    a, b = _adapter(root / "packed" / "a"), _adapter(root / "packed" / "b")
    assert any(not torch.allclose(a[k], b[k], **TOL) for k in a)  # two different experts, not one copied


def test_packed_gives_the_base_back_unchanged(trained: dict) -> None:
    model = trained["model"]
    assert not any(isinstance(m, MoLELinear) for m in model.modules()) and not model.training
    assert all(torch.equal(trained["before"][k], v) for k, v in model.state_dict().items())
    assert trained["flags"] == {n: p.requires_grad for n, p in model.named_parameters()}


class Crash(RuntimeError):
    pass


def test_packed_resumes_after_a_crash(trained: dict, tmp_path: Path) -> None:
    def crash(name: str, step: int, total: int, loss: float) -> None:
        if name == "b" and step == 3:
            raise Crash

    model, tok = trained["model"], trained["tok"]
    with pytest.raises(Crash):
        train_packed(model, tok, _experts(tmp_path), lora=LORA, cfg=CFG, rows_per_forward=2, progress=crash)
    assert not any(isinstance(m, MoLELinear) for m in model.modules())
    assert all(json.loads((checkpoint_dir(tmp_path / n) / "state.json").read_text())["step"] == 2 for n in ROWS)
    metrics = train_packed(model, tok, _experts(tmp_path), lora=LORA, cfg=CFG, rows_per_forward=2)
    for name in ROWS:
        assert metrics[name]["resumed_from"] == 2 and len(metrics[name]["loss"]) == STEPS
        full, resumed = _adapter(trained["root"] / "packed" / name), _adapter(tmp_path / name)
        for key in full:
            torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6)


def test_cli_train_experts_packed_writes_loadable_peft_adapters(workspace: Path) -> None:
    # Packed residual experts (a cotrained run trains its experts together whatever experts.mode says).
    overrides = ["cluster.embedder=tfidf", "cluster.k=2", "experts.steps=2", "experts.batch_size=4",
                 "experts.max_length=32", "experts.mode=packed", "experts.shared=residual"]  # fmt: skip
    cfg = load_config(None, preset="tiny", overrides=overrides)
    stages.prepare(cfg)
    stages.cluster(cfg)
    args = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "mole.cli", "train-experts", "--preset", "tiny", *args],
                          cwd=workspace, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    index = json.loads((workspace / "artifacts/experts/experts.json").read_text())
    assert [x["id"] for x in index["experts"]] == ["expert_00", "expert_01"]
    base, tok = load_base("tiny")
    batch = tok(["Add 2 and 3.\nAnswer: 5"], return_tensors="pt")
    with torch.no_grad():
        plain = base(**batch).logits
    for entry in index["experts"]:
        metrics = json.loads((workspace / entry["path"] / "train_metrics.json").read_text())
        assert metrics["mode"] == "packed" and metrics["steps"] == 2 and metrics["fingerprint"] == entry["fingerprint"]
        peft_model = PeftModel.from_pretrained(base, str(workspace / entry["path"])).eval()
        with torch.no_grad():
            assert not torch.allclose(peft_model(**batch).logits, plain)
        base = peft_model.unload()
    baseline = json.loads((workspace / index["baseline"]["path"] / "train_metrics.json").read_text())
    # The shared LoRA and the multitask baseline train on their own; the baseline for the rows of the shared LoRA,
    # both experts and the joint phase (same batch size here).
    sh = cfg.experts.shared_steps
    assert "mode" not in baseline and baseline["steps"] == sh + 2 * 2 + cfg.router.steps * 8 // 4
    assert json.loads((workspace / index["shared"]["path"] / "train_metrics.json").read_text())["steps"] == sh
    assert run_train_experts(cfg)["reused"] == ["shared", "expert_00", "expert_01", "multitask_lora"]


@pytest.mark.parametrize("how", ["init_from", "under"])
def test_packed_experts_on_a_shared_adapter_match_separate_runs(how: str, tmp_path: Path) -> None:
    """Branched (init_from) and residual (under) experts: packed training gives the adapters of train_lora."""
    model, tok = load_base("tiny")
    every = [r for rows in ROWS.values() for r in rows]
    train_lora(model, tok, every, lora=LORA, cfg=CFG, steps=3, out_dir=tmp_path / "shared", seed=9, fingerprint="s")
    on = {how: tmp_path / "shared"}
    for e in _experts(tmp_path / "separate"):
        train_lora(model, tok, e.rows, lora=LORA, cfg=CFG, steps=e.steps, out_dir=e.out_dir, seed=e.seed,
                   fingerprint=e.fingerprint, **on)  # fmt: skip
    train_packed(model, tok, _experts(tmp_path / "packed"), lora=LORA, cfg=CFG, rows_per_forward=2, **on)
    shared = _adapter(tmp_path / "shared")
    for name in ROWS:
        sep, pk = _adapter(tmp_path / "separate" / name), _adapter(tmp_path / "packed" / name)
        assert sep.keys() == pk.keys() == shared.keys()
        for key in sep:
            torch.testing.assert_close(pk[key], sep[key], **TOL, msg=lambda m, k=f"{name} {key}": f"{k}: {m}")
        # A branched expert moved away from the shared weights it started from; a residual one from zero.
        start = shared if how == "init_from" else {k: torch.zeros_like(v) for k, v in shared.items()}
        assert max((pk[k] - start[k]).abs().max() for k in pk if "lora_B" in k) > 100 * TOL["atol"]
