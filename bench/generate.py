"""Generation tokens/s: base and MoLE with the KV cache, and X-LoRA (which refuses a KV cache), same experts.

Greedy decoding of exactly ``new`` tokens from one demo prompt, timed interleaved; N=8 experts, k=2, r=16.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import interleaved, make_adapters, median, paired_ratio, table
from bench.forward import mole_model, xlora_model

SETTINGS = {"quick": (16, 3), "full": (48, 5)}  # new tokens, timed rounds
PROMPT = "Convert 3.5 kilometers to meters.\nAnswer:"
N, K, R = 8, 2, 16


def run(model: torch.nn.Module, tok: Any, *, mode: str) -> dict[str, Any]:
    """Time greedy generation of the three variants; return tokens/s and ratios to the base."""
    new, reps = SETTINGS[mode]
    enc = tok([PROMPT], return_tensors="pt")
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}
    pad = {"pad_token_id": tok.pad_token_id}  # MoLEModel.generate passes its own
    with tempfile.TemporaryDirectory(prefix="mole-bench-") as tmp:
        dirs = make_adapters(model, Path(tmp), n=N, r=R)
        mole, xlora = mole_model(model, tok, dirs, K), xlora_model(model, dirs, K)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    fns = {
        "base": lambda: model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw, **pad),
        f"mole k={K}": lambda: mole.generate(ids, mask, use_cache=True, **kw),
        f"xlora k={K} (no KV cache)": lambda: xlora.generate(
            input_ids=ids, attention_mask=mask, use_cache=False, **kw, **pad
        ),
    }
    times = interleaved(fns, reps=reps)
    rows = [
        {
            "variant": name,
            "new_tokens": new,
            "s": round(median(ts), 3),
            "tokens_per_s": round(new / median(ts), 2),
            "time_ratio_to_base": round(paired_ratio(ts, times["base"]), 3),
        }  # fmt: skip
        for name, ts in times.items()
    ]
    title = f"generation, 1 prompt ({ids.shape[1]} tokens) + {new} greedy tokens, N={N} r={R}: median of {reps}"
    table(title, ["variant", "new_tokens", "s", "tokens_per_s", "time_ratio_to_base"], rows)
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": new, "reps": reps, "N": N, "k": K, "r": R, "rows": rows}
