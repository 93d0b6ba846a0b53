"""MoLE forward time / base forward time on the demo model's shapes, measured in the same run.

The model is SmolLM2-135M's architecture with random weights (shapes are what cost time), MoLE banks in the
configured target modules. Timings interleave base and MoLE forwards and take medians. Run:

    python -m bench.layer              # full grid N in {4, 8, 16}, k in {1, 2}, r in {8, 16}
    python -m bench.layer --quick      # fewer repeats and a shorter sequence
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from mole.nn.model import MoLEModel
from mole.nn.spec import MoLESpec

# SmolLM2-135M-Instruct's architecture (config.json of the demo model).
DEMO_SHAPES = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def _base() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**DEMO_SHAPES)).eval()


def _time(fn, reps: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def floor_ratio(n: int, r: int, targets: list[str]) -> float:
    """Extra FLOPs of the banks over the base forward (matmul FLOPs only), as 1 + ratio."""
    d, f, kv = DEMO_SHAPES["hidden_size"], DEMO_SHAPES["intermediate_size"], 192
    dims = {
        "q_proj": (d, d),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (d, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    base = sum(i * o for i, o in dims.values()) + DEMO_SHAPES["vocab_size"] * d / DEMO_SHAPES["num_hidden_layers"]
    extra = sum(n * r * (dims[t][0] + dims[t][1]) for t in targets)
    return 1 + extra / base


def run(
    quick: bool = False, targets: tuple[str, ...] = ("q_proj", "v_proj"), batch: int = 4, seq: int = 128
) -> list[dict]:
    """Measure the grid; return one row per (N, k, r)."""
    reps, seq = (3, 64) if quick else (7, seq)
    base = _base()
    ids = torch.randint(0, DEMO_SHAPES["vocab_size"], (batch, seq))
    rows = []
    for n, k, r in itertools.product((4, 8, 16), (1, 2), (8, 16)):
        base = _base() if rows else base  # a fresh base per config: MoLEModel edits its modules in place
        spec = MoLESpec(
            base_model={"name": "bench"},
            expert_ids=[f"e{i}" for i in range(n)],
            r=r,
            lora_alpha=2.0 * r,
            target_modules=list(targets),
            top_k=k,
        )
        with torch.no_grad():
            plain = _base()
            model = MoLEModel(base=base, tokenizer=None, spec=spec).eval()
            for layer in model.bank.values():
                layer.lora_B.normal_(std=0.01)
            plain(ids), model(ids)  # warm-up
            t_base, t_mole = [], []
            for _ in range(reps):  # interleave so drifts in machine load hit both alike
                t_base += _time(lambda m=plain: m(ids), 1)
                t_mole += _time(lambda m=model: m(ids), 1)
        ratio = statistics.median(t_mole) / statistics.median(t_base)
        rows.append(
            {
                "N": n,
                "k": k,
                "r": r,
                "base_ms": round(1000 * statistics.median(t_base), 1),
                "mole_ms": round(1000 * statistics.median(t_mole), 1),
                "ratio": round(ratio, 3),
                "flop_floor": round(floor_ratio(n, r, list(targets)), 3),
            }
        )
        print(
            f"N={n:2d} k={k} r={r:2d}  base {rows[-1]['base_ms']:8.1f} ms  mole {rows[-1]['mole_ms']:8.1f} ms  "
            f"ratio {ratio:5.3f}  (FLOP floor {rows[-1]['flop_floor']:.3f})",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.layer [--quick] [--out PATH]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--out", default="bench/results/layer.json")
    args = parser.parse_args(argv)
    print(f"threads={torch.get_num_threads()} targets={args.targets} batch=4", flush=True)
    rows = run(quick=args.quick, targets=tuple(args.targets.split(",")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "targets": args.targets, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
