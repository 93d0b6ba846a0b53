"""The benchmark suite's pieces on the tiny model: shared weights, adapters, every peer builds and runs, headline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.__main__ import headline
from bench.common import make_adapters, shared_copy
from bench.forward import _variants, layer_floor
from bench.generate import PROMPTS, encode
from bench.readme import render
from mole.base import load_base

REPO = Path(__file__).resolve().parents[1]


def test_layer_floor_is_the_banks_extra_flops() -> None:
    # N=8, r=16 on a 576 x 576 linear: 8 * 16 * 1152 / 576**2 extra.
    assert layer_floor(8, 16, 576, 576) == pytest.approx(1 + 8 * 16 * 1152 / 576**2)
    assert layer_floor(1, 1, 4, 4) == 1.5


def test_shared_copy_shares_weights_not_modules() -> None:
    model, _ = load_base("tiny")
    copy = shared_copy(model)
    assert copy is not model and copy.model.layers[0] is not model.model.layers[0]
    assert all(a is b for a, b in zip(model.parameters(), copy.parameters(), strict=True))


def test_peers_build_on_the_same_adapters_and_run(tmp_path: Path) -> None:
    model, tok = load_base("tiny")
    dirs = make_adapters(model, tmp_path, n=3, r=2)
    tensors = load_file(str(dirs[0] / "adapter_model.safetensors"))
    assert all(t.abs().sum() > 0 for t in tensors.values())  # A and B both non-zero: experts change the output
    fns, failed = _variants(model, tok, dirs, ks=[1, 2], peer_ks=[2])
    assert failed == {}
    assert sorted(fns) == ["arrow k=2", "base", "mole k=1", "mole k=2", "naive sum", "xlora k=2"]
    ids = torch.randint(0, 256, (2, 8))
    with torch.inference_mode():
        base = fns["base"](ids).logits
        for name, fn in fns.items():
            out = fn(ids)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            assert logits.shape == base.shape, name
            if name != "base":
                assert not torch.allclose(logits, base), name  # the experts are really in the forward
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("q_proj"))


def test_headline_compares_with_the_goals() -> None:
    forward = {"rows": [{"variant": "mole k=2", "N": 8, "r": 16, "ms": 110.0, "ratio_to_base": 1.1},
                        {"variant": "mole k=1", "N": 4, "r": 8, "ms": 106.0, "ratio_to_base": 1.06},
                        {"variant": "xlora k=2", "N": 8, "r": 16, "ms": 330.0, "ratio_to_base": 3.3}]}  # fmt: skip
    generate = {"batches": [1, 8], "rows": [
        {"variant": "mole k=2", "batch": 1, "tokens_per_s": 27.0, "speed_vs_base": 0.9},
        {"variant": "mole cluster (merged)", "batch": 1, "tokens_per_s": 29.0, "speed_vs_base": 0.98},
        {"variant": "xlora k=2 (no KV cache)", "batch": 1, "tokens_per_s": 3.0, "speed_vs_base": 0.1},
        {"variant": "mole k=2", "batch": 8, "tokens_per_s": 100.0, "speed_vs_base": 0.8}]}  # fmt: skip
    train = {"rows": [{"mode": "one", "tokens_per_s": 10.0, "peak_rss_mb": 1000.0},
                      {"mode": "sequential", "tokens_per_s": 10.0, "peak_rss_mb": 1010.0},
                      {"mode": "packed", "tokens_per_s": 12.0, "peak_rss_mb": 1400.0}]}  # fmt: skip
    got = {h["metric"]: (h["value"], h["met"]) for h in headline({"forward": forward, "generate": generate,
                                                                  "train": train})}  # fmt: skip
    assert got == {
        "MoLE / base prefill time, N=8 k=2 r=16": (1.1, True),
        "MoLE / base prefill time, N=4 k=1 r=8": (1.06, False),
        "X-LoRA / MoLE forward time, N=8 k=2 r=16": (3.0, True),
        "MoLE / base decode tokens/s, batch 1": (0.9, True),
        "MoLE cluster-routed (merged) / base decode tokens/s, batch 1": (0.98, True),
        "MoLE / base decode tokens/s, batch 8": (0.8, False),
        "MoLE / X-LoRA decode tokens/s, batch 1": (9.0, None),
        "packed / sequential training tokens/s": (1.2, False),
        "packed peak RSS / one expert's": (1.4, False),
    }


def test_decode_bench_left_pads_prompts_of_different_lengths() -> None:
    _, tok = load_base("tiny")
    ids, mask = encode(tok, PROMPTS[:3], torch.device("cpu"))
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == 3 and (mask[:, -1] == 1).all()  # real tokens end every row
    assert all((mask[i, : ids.shape[1] - int(n)] == 0).all() for i, n in enumerate(lengths))
    assert tok.padding_side == load_base("tiny")[1].padding_side  # the tokenizer is given back as it was


def test_readme_tables_are_the_committed_results() -> None:
    text = (REPO / "README.md").read_text()
    assert "<!-- bench:suite begin" in text and "<!-- bench:layer begin" in text
    assert render(text) == text, "README.md's benchmark tables differ from bench/results: run python -m bench.readme"
    headline_rows = json.loads((REPO / "bench/results/quick/summary.json").read_text())["headline"]
    assert all(h["metric"] in text for h in headline_rows)


def test_lifecycle_files_grow_only_the_named_skills_and_hold_one_out(tmp_path: Path) -> None:
    from bench.lifecycle import EVAL_PER_SKILL, demo_files

    files = demo_files(tmp_path, rows_per_skill=10, grow=0.1, grow_skills=2)

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in files[name].read_text().splitlines()]

    week1, week2, evals, without = read("week1"), read("week2"), read("eval"), read("without")
    ids = {json.dumps(r, sort_keys=True) for r in week1}
    new = [r for r in week2 if json.dumps(r, sort_keys=True) not in ids]
    assert len(week1) == 60 and len(week2) == 66 and len(new) == 6  # 10 % more rows in all, week1 kept whole
    assert {r["domain"] for r in new} == set(files["grown"]) and len(files["grown"]) == 2
    assert len(evals) == 6 * EVAL_PER_SKILL and not {json.dumps(r, sort_keys=True) for r in evals} & ids
    assert files["held_out"] not in {r["domain"] for r in without} and len(without) == 50
