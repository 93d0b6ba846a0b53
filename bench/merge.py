"""Merge/prune effect: forward latency and adapter size of a MoLE model before and after merging and pruning.

The N=8, k=2, r=16 bank loses two experts through ``mole.merge.apply_plan``: experts 0 and 1 are merged (SVD of the
weighted sum, rank r) and expert 7 is pruned. The decisions are fixed here (no eval data to base them on); the
stage ``merge-prune`` takes them from utilization and similarity. Latency is the prefill of the forward case.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import interleaved, make_adapters, median, paired_ratio, shared_copy, table
from bench.forward import SHAPES, mole_model

N, K, R = 8, 2, 16
DECISIONS = [
    {"action": "merge", "experts": [0, 1], "weights": [0.5, 0.5]},
    {"action": "prune", "expert": 7, "clusters_to": 6},
]


def _size_mb(directory: Path) -> float:
    """Bytes of the experts' and router's tensor files, in MiB."""
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors")) / 2**20


def run(model: torch.nn.Module, tok: Any, *, mode: str) -> dict[str, Any]:
    """Time base, MoLE before and MoLE after merge/prune, interleaved; return latency and size rows."""
    from mole.merge import apply_plan
    from mole.nn.model import MoLEModel

    batch, seq, reps = SHAPES[mode]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    with tempfile.TemporaryDirectory(prefix="mole-bench-") as tmp:
        root = Path(tmp)
        before = mole_model(model, tok, make_adapters(model, root / "adapters", n=N, r=R), K)
        before.save_pretrained(root / "before")
        apply_plan(before, DECISIONS, root / "after")
        after = MoLEModel.from_pretrained(root / "after", base=shared_copy(model), tokenizer=tok)
        sizes = {"before": _size_mb(root / "before"), "after": _size_mb(root / "after")}
    fns = {"base": lambda: model(input_ids=ids), "before": lambda: before(ids), "after": lambda: after(ids)}
    times = interleaved(fns, reps=reps)
    experts = {"base": 0, "before": before.spec.num_experts, "after": after.spec.num_experts}
    rows = [
        {
            "stage": name,
            "experts": experts[name],
            "adapter_mb": round(sizes.get(name, 0.0), 2),
            "ms": round(1000 * median(ts), 1),
            "ratio_to_base": round(paired_ratio(ts, times["base"]), 3),
        }  # fmt: skip
        for name, ts in times.items()
    ]
    table(f"merge/prune: merge experts 0+1, prune 7 (N={N} k={K} r={R}), prefill {batch}x{seq}", list(rows[0]), rows)
    return {"batch": batch, "tokens": seq, "reps": reps, "decisions": DECISIONS, "rows": rows}
