"""Decode tokens/s at batch 1 and 8: base and MoLE with the KV cache, and X-LoRA (which refuses a KV cache).

Greedy decoding of exactly ``new`` tokens, timed interleaved with the base in the same rounds; N=8 experts, k=2, r=16.
Batch 8 is eight prompts of different lengths, left-padded into one batch. Variants:

- ``mole k=2``: token routing, every block's router at every step;
- ``mole cluster (merged)``: every prompt routed whole to one expert (cluster routing), which ``MoLEModel.generate``
  folds into the base weights once per request;
- ``mole k=2 compiled``: the token-routed model with ``torch.compile`` on its blocks (``--full``, or ``--compile``);
- ``xlora k=2 (no KV cache)``: batch 1 only.

Tokens/s count every sequence of the batch; ``speed_vs_base`` is the median over rounds of base time / variant time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import interleaved, make_adapters, median, paired_ratio, table
from bench.forward import mole_model, xlora_model

SETTINGS = {"quick": (16, 5), "full": (48, 5)}  # new tokens, timed rounds
BATCHES = (1, 8)
PROMPTS = [
    "Convert 3.5 kilometers to meters.\nAnswer:",
    "What is 17 times 23?\nAnswer:",
    "Translate to French: the cat sleeps on the warm windowsill every afternoon.\nAnswer:",
    "Name the capital of Japan.\nAnswer:",
    "Write a Python function that returns the square of a number.\nAnswer:",
    "Is 91 a prime number? Explain briefly.\nAnswer:",
    "Summarize: The meeting was moved from Monday to Thursday because two of the speakers were travelling.\nAnswer:",
    "Spell 'necessary' backwards.\nAnswer:",
]
N, K, R = 8, 2, 16


def encode(tok: Any, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) ids and attention mask of ``prompts`` on ``device``."""
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _variants(model: Any, tok: Any, mole: Any, xlora: Any, batch: int, new: int, compiled: Any) -> dict[str, Callable]:
    ids, mask = encode(tok, PROMPTS[:batch], model.device)
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "use_cache": True}
    pad = {"pad_token_id": tok.pad_token_id}  # MoLEModel.generate passes its own
    route = torch.zeros(batch, dtype=torch.long)  # every prompt to expert 0, as cluster routing would
    fns = {
        "base": lambda: model.generate(input_ids=ids, attention_mask=mask, **kw, **pad),
        f"mole k={K}": lambda: mole.generate(ids, mask, **kw),
        "mole cluster (merged)": lambda: mole.generate(ids, mask, route=route, **kw),
    }
    if compiled is not None:
        fns[f"mole k={K} compiled"] = lambda: compiled.generate(ids, mask, **kw)
    if batch == 1:
        fns[f"xlora k={K} (no KV cache)"] = lambda: xlora.generate(
            input_ids=ids, attention_mask=mask, **{**kw, "use_cache": False}, **pad
        )
    return fns


def run(model: torch.nn.Module, tok: Any, *, mode: str, compile: bool | None = None) -> dict[str, Any]:
    """Time greedy decoding of every variant at each batch size; return tokens/s and speed relative to the base."""
    new, reps = SETTINGS[mode]
    with tempfile.TemporaryDirectory(prefix="mole-bench-") as tmp:
        dirs = make_adapters(model, Path(tmp), n=N, r=R)
        mole, xlora = mole_model(model, tok, dirs, K), xlora_model(model, dirs, K)
        compiled = None
        if compile if compile is not None else mode == "full":
            compiled = mole_model(model, tok, dirs, K)
            compiled.compile_blocks()
    rows: list[dict[str, Any]] = []
    for batch in BATCHES:
        times = interleaved(_variants(model, tok, mole, xlora, batch, new, compiled), reps=reps)
        group = [
            {
                "variant": name,
                "batch": batch,
                "new_tokens": new,
                "s": round(median(ts), 3),
                "tokens_per_s": round(batch * new / median(ts), 2),
                "speed_vs_base": round(1 / paired_ratio(ts, times["base"]), 3),
            }  # fmt: skip
            for name, ts in times.items()
        ]
        cols = ["variant", "batch", "new_tokens", "s", "tokens_per_s", "speed_vs_base"]
        table(f"decode, batch {batch} (left-padded) + {new} greedy tokens, N={N} k={K} r={R}: median of {reps}", cols,
              group)  # fmt: skip
        rows += group
    return {"batches": list(BATCHES), "new_tokens": new, "reps": reps, "N": N, "k": K, "r": R, "rows": rows}
