from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from mole import stages
from mole.base import load_base
from mole.config import load_config
from mole.data.tokenize import train_batches
from mole.sections import ExpertsConfig, LoraSection
from mole.training.checkpoint import checkpoint_dir
from mole.training.experts import run_train_experts
from mole.training.lora import expert_id, is_finished, lr_factor, train_lora

ROWS = [{"prompt": f"Add {a} and {b}.\nAnswer:", "completion": str(a + b)} for a in range(3) for b in range(2)]
LORA = LoraSection(r=4, lora_alpha=8)
CFG = ExpertsConfig(batch_size=2, max_length=32, lr=1e-2, warmup_steps=1, checkpoint_every=2)


class Crash(RuntimeError):
    pass


def _crash_at(step: int):
    def progress(done: int, total: int, loss: float) -> None:
        if done == step:
            raise Crash(f"simulated crash at step {done}")

    return progress


def _adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "adapter_model.safetensors"))


def _no_lora(model: torch.nn.Module) -> bool:
    return not any("lora" in name for name, _ in model.named_modules())


@pytest.fixture
def tiny():
    return load_base("tiny")


def test_expert_id_and_schedule() -> None:
    assert [expert_id(c) for c in (0, 1, 12)] == ["expert_00", "expert_01", "expert_12"]
    assert [lr_factor(s, 6, 2) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]  # warmup, decay, never 0
    assert [lr_factor(s, 3, 0) for s in range(3)] == [1.0, 2 / 3, 1 / 3]


def test_expert_overfits_and_round_trips_through_peft(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batch = tok(["Add 2 and 3.\nAnswer: 5"], return_tensors="pt")
    live: dict[str, torch.Tensor] = {}

    def grab(done: int, total: int, loss: float) -> None:
        if done == total:  # the adapter is still injected into `model`: its logits are the trained adapter's
            with torch.no_grad():
                live["logits"] = model(**batch).logits

    cfg = CFG.model_copy(update={"warmup_steps": 0})
    metrics = train_lora(model, tok, ROWS[:2], lora=LORA, cfg=cfg, steps=10, out_dir=tmp_path / "e", seed=0,
                         fingerprint="fp", progress=grab)  # fmt: skip
    losses = metrics["loss"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.2
    assert metrics["resumed_from"] == 0 and metrics["rows"] == 2 and metrics["tokens"] > 0
    assert {"adapter_config.json", "adapter_model.safetensors", "train_metrics.json"} <= {
        p.name for p in (tmp_path / "e").iterdir()
    }
    assert json.loads((tmp_path / "e" / "train_metrics.json").read_text()) == metrics
    assert not checkpoint_dir(tmp_path / "e").exists() and is_finished(tmp_path / "e", "fp")
    assert not is_finished(tmp_path / "e", "other")

    # The base object is given back as it was: no LoRA modules, same weights, same flags, eval mode.
    assert _no_lora(model) and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}

    fresh, _ = load_base("tiny")
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "e")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, live["logits"], rtol=0, atol=1e-6)
        assert not torch.allclose(model(**batch).logits, live["logits"])  # the adapter did change the output


def test_recorded_loss_is_the_models_own_mean_loss(tiny, tmp_path: Path) -> None:
    """train_lora runs the LM head at the labelled positions only; its loss is still the model's own mean next-token
    loss over a padded batch of rows of different lengths (at step 0 the adapter is zero: the base's loss)."""
    model, tok = tiny
    rows = [*ROWS[:2], {"text": "The cat sat on the red mat, and then on the blue one."}]
    cfg = CFG.model_copy(update={"batch_size": 3})
    first = next(train_batches(rows, tok, batch_size=3, max_length=cfg.max_length, seed=0, steps=1))
    assert first["attention_mask"].min() == 0  # padded: the rows' lengths differ
    with torch.no_grad():
        expected = float(model(**{k: first[k] for k in ("input_ids", "attention_mask", "labels")}).loss)
    metrics = train_lora(model, tok, rows, lora=LORA, cfg=cfg, steps=1, out_dir=tmp_path / "e", seed=0,
                         fingerprint="fp")  # fmt: skip
    assert metrics["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_same_seed_gives_identical_adapter(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    kw = {"lora": LORA.model_copy(update={"lora_dropout": 0.1}), "cfg": CFG, "steps": 4, "fingerprint": "fp"}
    train_lora(model, tok, ROWS, out_dir=tmp_path / "a", seed=3, **kw)
    train_lora(model, tok, ROWS, out_dir=tmp_path / "b", seed=3, **kw)  # the same base object, reused
    train_lora(model, tok, ROWS, out_dir=tmp_path / "c", seed=4, **kw)
    a, b, c = (_adapter(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_after_crash_matches_uninterrupted_run(tiny, tmp_path: Path, caplog) -> None:
    model, tok = tiny
    kw = {"lora": LORA.model_copy(update={"lora_dropout": 0.1}), "cfg": CFG, "steps": 6, "seed": 1}
    full = train_lora(model, tok, ROWS, out_dir=tmp_path / "full", fingerprint="fp", **kw)

    with pytest.raises(Crash):
        train_lora(model, tok, ROWS, out_dir=tmp_path / "run", fingerprint="fp", progress=_crash_at(3), **kw)
    ckpt = checkpoint_dir(tmp_path / "run")
    assert not (tmp_path / "run").exists() and _no_lora(model)
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter.safetensors", "optimizer.safetensors", "state.json"]
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert any(k.startswith("exp_avg_sq/") for k in load_file(str(ckpt / "optimizer.safetensors")))

    with caplog.at_level(logging.INFO, logger="mole.training.lora"):
        resumed = train_lora(model, tok, ROWS, out_dir=tmp_path / "run", fingerprint="fp", **kw)
    assert resumed["resumed_from"] == 2 and "resuming from its checkpoint at step 2/6" in caplog.text
    assert not ckpt.exists() and len(resumed["loss"]) == 6
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(full["loss"]), rtol=0, atol=1e-6)
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_stale_checkpoint_is_ignored(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    kw = {"lora": LORA, "cfg": CFG, "steps": 4, "seed": 0, "out_dir": tmp_path / "e"}
    with pytest.raises(Crash):
        train_lora(model, tok, ROWS, fingerprint="old", progress=_crash_at(3), **kw)
    assert checkpoint_dir(tmp_path / "e").is_dir()
    metrics = train_lora(model, tok, ROWS, fingerprint="new", **kw)
    assert metrics["resumed_from"] == 0 and metrics["fingerprint"] == "new"
    assert not checkpoint_dir(tmp_path / "e").exists()


def test_run_train_experts_trains_then_reuses(workspace: Path) -> None:
    # Residual experts: one training run each (the cotrained run is tested below).
    overrides = ["cluster.embedder=tfidf", "cluster.k=2", "experts.steps=2", "experts.batch_size=2",
                 "experts.max_length=32", "experts.checkpoint_every=1", "experts.shared=residual"]  # fmt: skip
    cfg = load_config(None, preset="tiny", overrides=overrides)
    with pytest.raises(FileNotFoundError, match="run `mole prepare` first"):
        run_train_experts(cfg)
    stages.prepare(cfg)
    stages.cluster(cfg)
    calls: list[tuple[str, int, int]] = []
    summary = run_train_experts(cfg, progress=lambda name, step, total, loss: calls.append((name, step, total)))

    assert summary["k"] == 2 and summary["trained"] == ["shared", "expert_00", "expert_01", "multitask_lora"]
    # The rows of the shared LoRA, both experts and the joint phase (which trains them too), in steps of the
    # baseline's batch size.
    sh = cfg.experts.shared_steps
    mt = math.ceil(((sh + 2 * 2) * 2 + cfg.router.steps * cfg.router.batch_size) / 2)
    assert ("expert_01", 2, 2) in calls and ("multitask_lora", mt, mt) in calls and ("shared", sh, sh) in calls
    index = json.loads((workspace / "artifacts/experts/experts.json").read_text())
    assert [x["id"] for x in index["experts"]] == ["expert_00", "expert_01"]
    assert index["baseline"]["path"] == "artifacts/baselines/multitask_lora" and index["baseline"]["steps"] == mt
    assert sum(x["rows"] for x in index["experts"]) == index["baseline"]["rows"]
    for entry in [*index["experts"], index["baseline"]]:
        assert is_finished(workspace / entry["path"], entry["fingerprint"]) and not entry["reused"]
    files = [p for p in (workspace / "artifacts").rglob("*") if p.is_file() and p.name != "experts.json"]
    assert not [p for p in (workspace / "artifacts").rglob("*") if ".ckpt" in p.name or ".mole-tmp" in p.name]
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    again = run_train_experts(cfg)
    assert again["trained"] == [] and again["reused"] == ["shared", "expert_00", "expert_01", "multitask_lora"]
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert all(x["reused"] for x in json.loads((workspace / "artifacts/experts/experts.json").read_text())["experts"])

    # A longer joint phase changes the baseline's steps only: the experts are reused.
    longer = load_config(None, preset="tiny", overrides=[*overrides, f"router.steps={cfg.router.steps + 1}"])
    assert run_train_experts(longer)["trained"] == ["multitask_lora"]
    # More expert steps retrain the experts and the baseline; the shared LoRA does not depend on them.
    more = load_config(None, preset="tiny", overrides=[*overrides[:2], "experts.steps=3", *overrides[3:]])
    assert run_train_experts(more)["trained"] == ["expert_00", "expert_01", "multitask_lora"]
    # A longer shared phase retrains the shared LoRA and everything built on it.
    shared = load_config(None, preset="tiny", overrides=[*overrides[:2], "experts.steps=3", *overrides[3:],
                                                         "experts.shared_steps=4"])  # fmt: skip
    assert run_train_experts(shared)["trained"] == ["shared", "expert_00", "expert_01", "multitask_lora"]


def test_cotrained_run_trains_every_adapter_once_then_reuses_them(workspace: Path) -> None:
    overrides = ["cluster.embedder=tfidf", "cluster.k=2", "experts.steps=2", "experts.shared_steps=2",
                 "experts.batch_size=2", "experts.max_length=32", "experts.checkpoint_every=1",
                 "experts.shared=cotrained"]  # fmt: skip
    cfg = load_config(None, preset="tiny", overrides=overrides)
    stages.prepare(cfg)
    stages.cluster(cfg)
    calls: list[tuple[str, int, int]] = []
    summary = run_train_experts(cfg, progress=lambda name, step, total, loss: calls.append((name, step, total)))
    assert summary["trained"] == ["shared", "expert_00", "expert_01", "multitask_lora"]
    assert [c for c in calls if c[0] == "cotrained"] == [("cotrained", s, 6) for s in range(1, 7)]  # 2 + 2 x 2 steps
    index = json.loads((workspace / "artifacts/experts/experts.json").read_text())
    assert index["shared_mode"] == "cotrained" and index["training"]["cotrained_steps"] == 6
    assert index["shared"]["steps"] == 6 and [x["steps"] for x in index["experts"]] == [6, 6]
    assert index["baseline"]["steps"] == math.ceil((6 * 2 + cfg.router.steps * cfg.router.batch_size) / 2)
    for entry in [*index["experts"], index["shared"]]:
        assert is_finished(workspace / entry["path"], entry["fingerprint"])
        adapter_config = json.loads((workspace / entry["path"] / "adapter_config.json").read_text())
        assert adapter_config["r"] == cfg.experts.lora.r
    assert not [p for p in (workspace / "artifacts").rglob("*") if ".ckpt" in p.name or ".mole-tmp" in p.name]
    assert run_train_experts(cfg)["reused"] == ["shared", "expert_00", "expert_01", "multitask_lora"]
    # Every adapter of the run depends on all of it: one more step per expert retrains them all.
    more = load_config(None, preset="tiny", overrides=[*overrides, "experts.steps=3"])
    assert run_train_experts(more)["trained"] == ["shared", "expert_00", "expert_01", "multitask_lora"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], 45 + 3 * 15 + 20),  # the shared LoRA, three experts, the joint phase
        (["experts.shared_steps=10"], 10 + 3 * 15 + 20),
        (["experts.shared=none"], 3 * 15 + 20),
        (["experts.shared=none", "router.freeze_experts=true"], 3 * 15),
        (["experts.shared=none", "router.expert_lr=0"], 3 * 15),
        (["experts.shared=none", "router.routing=cluster"], 3 * 15),
        (["experts.shared=none", "router.steps=0"], 3 * 15),
        (["router.batch_size=8"], 45 + 3 * 15 + 2 * 20),  # joint rows counted at the joint phase's batch size
        (["experts.multitask_steps=7"], 7),
    ],
)
def test_multitask_baseline_gets_the_training_rows_mole_gets(overrides: list[str], expected: int) -> None:
    from mole.training.experts import multitask_steps

    sizes = ["experts.steps=15", "experts.shared_steps=45", "router.steps=20", "experts.batch_size=4",
             "router.batch_size=4"]  # fmt: skip
    cfg = load_config(None, overrides=[*sizes, *overrides])
    assert multitask_steps(cfg, 3) == expected


@pytest.mark.parametrize(
    ("overrides", "rank"),
    [(["experts.shared=residual"], 8 * 3), (["experts.shared=seed"], 8 * 2),
     (["experts.shared=none", "router.top_k=1"], 8), (["experts.multitask_r=4"], 4)],
)  # fmt: skip
def test_multitask_baseline_gets_at_least_the_rank_mole_applies_per_token(overrides: list[str], rank: int) -> None:
    from mole.training.experts import multitask_lora

    cfg = load_config(None, overrides=["experts.lora.r=8", "experts.lora.lora_alpha=16", "router.top_k=2", *overrides])
    lora = multitask_lora(cfg, 5)
    assert lora.r == rank and lora.lora_alpha / lora.r == 2.0  # the experts' scale alpha / r
    assert multitask_lora(cfg, 1).r <= rank  # k = 1: one routed expert at most
