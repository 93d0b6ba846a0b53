"""Forward latency (prefill of a batch): base, MoLE, and peft's X-LoRA, Arrow and a naive mixture, same experts.

For every (N, r) the same N peft adapters (random, non-zero A and B) are loaded into MoLE banks (k in the grid),
X-LoRA (``XLoraConfig``, top-k = k), Arrow (``ArrowConfig``, top-k = k) and a naive weighted sum of N per-expert
peft forwards. All run on one set of base weights and are timed interleaved with the base; ratios are to the base
of the same rounds. Two FLOP floors are printed: per adapted layer ``1 + N r (d_in + d_out) / (d_in d_out)``
(``floor_q_proj``, ``floor_v_proj``) and for the whole forward (``floor_model``, ``bench.layer.floor_ratio``:
the bank's extra FLOPs over all of the base's matmuls, LM head included).
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import TARGETS, interleaved, make_adapters, median, paired_ratio, shared_copy, table
from bench.layer import floor_ratio

GRID = {
    "quick": [(4, 1, 8), (8, 2, 16), (16, 2, 16)],
    "full": [(n, k, r) for n in (4, 8, 16) for k in (1, 2) for r in (8, 16)],
}
PEERS = {"quick": [(8, 2, 16)], "full": [(4, 2, 16), (8, 2, 16), (16, 2, 16)]}
SHAPES = {"quick": (2, 128, 5), "full": (4, 128, 7)}  # batch, tokens, timed rounds


def layer_floor(n: int, r: int, d_in: int, d_out: int) -> float:
    """Extra FLOPs of a dense bank of N rank-r experts over one d_out x d_in linear, as 1 + ratio."""
    return 1 + n * r * (d_in + d_out) / (d_in * d_out)


def mole_model(model: torch.nn.Module, tok: Any, dirs: list[Path], k: int) -> torch.nn.Module:
    """A MoLE model over ``dirs`` on a shared-weight copy of ``model`` (random token-router gates), with a first-token
    gate (random too) as a build gives it."""
    from mole.nn.model import MoLEModel

    ids = [d.name for d in dirs]
    return MoLEModel.from_experts(base=shared_copy(model), tokenizer=tok, expert_dirs=dirs, expert_ids=ids,
                                  base_ref={"name": "bench"}, top_k=k, first_gate=True).eval()  # fmt: skip


def xlora_model(model: torch.nn.Module, dirs: list[Path], k: int) -> torch.nn.Module:
    """peft X-LoRA over ``dirs`` (softmax over its top-k; X-LoRA refuses a KV cache, so use_cache is off)."""
    from peft import XLoraConfig, get_peft_model

    copy = shared_copy(model)
    copy.config.use_cache = False
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
                      adapters={str(i): str(d) for i, d in enumerate(dirs)}, top_k_lora=k, enable_softmax=False,
                      enable_softmax_topk=True)  # fmt: skip
    return get_peft_model(copy, cfg).eval()


def arrow_model(model: torch.nn.Module, dirs: list[Path], k: int) -> torch.nn.Module:
    """peft Arrow routing over ``dirs`` (training-free, per-token top-k from the adapters' singular vectors)."""
    from peft import ArrowConfig, create_arrow_model

    cfg = ArrowConfig(top_k=k, router_temperature=1.0, rng_seed=0)
    return create_arrow_model(shared_copy(model), [str(d) for d in dirs], cfg).eval()


def naive_mixture(model: torch.nn.Module, dirs: list[Path]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running one peft forward per expert and returning the uniformly weighted sum of the logits."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(shared_copy(model), str(dirs[0]), adapter_name="0")
    for i, d in enumerate(dirs[1:], start=1):
        pm.load_adapter(str(d), adapter_name=str(i))
    pm.eval()

    def forward(ids: torch.Tensor) -> torch.Tensor:
        out = None
        for i in range(len(dirs)):
            pm.set_adapter(str(i))
            logits = pm(input_ids=ids).logits / len(dirs)  # (B, T, V)
            out = logits if out is None else out + logits
        return out

    return forward


def _variants(
    model: Any, tok: Any, dirs: list[Path], ks: list[int], peer_ks: list[int]
) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> a function of the input ids, and name -> error for peers that failed to build."""
    fns: dict[str, Callable] = {"base": lambda ids: model(input_ids=ids)}
    for k in ks:
        mole = mole_model(model, tok, dirs, k)
        fns[f"mole k={k}"] = lambda ids, m=mole: m(ids)
    builders = {
        f"{name} k={k}": (build, k) for k in peer_ks for name, build in (("xlora", xlora_model), ("arrow", arrow_model))
    }
    if peer_ks:
        builders["naive sum"] = (lambda model, dirs, k: naive_mixture(model, dirs), 0)
    failed = {}
    for name, (build, k) in builders.items():
        try:
            m = build(model, dirs, k)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is a result to report, not a crash
            failed[name] = f"{type(exc).__name__}: {exc}"
            continue
        fns[name] = m if name == "naive sum" else (lambda ids, m=m: m(input_ids=ids))
    return fns, failed


def run(model: torch.nn.Module, tok: Any, *, mode: str) -> dict[str, Any]:
    """Measure the grid and the peers; print a table per (N, r) and return every row."""
    batch, seq, reps = SHAPES[mode]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    d, kv = model.config.hidden_size, model.config.num_key_value_heads * model.config.head_dim
    dims = {"q_proj": (d, d), "v_proj": (d, kv)}
    rows: list[dict[str, Any]] = []
    for n, r in sorted({(n, r) for n, _, r in GRID[mode] + PEERS[mode]}):
        ks = sorted({k for n2, k, r2 in GRID[mode] if (n2, r2) == (n, r)})
        peer_ks = sorted({k for n2, k, r2 in PEERS[mode] if (n2, r2) == (n, r)})
        with tempfile.TemporaryDirectory(prefix="mole-bench-") as tmp:
            fns, failed = _variants(model, tok, make_adapters(model, Path(tmp), n=n, r=r), ks, peer_ks)
            times = interleaved({name: (lambda f=f: f(ids)) for name, f in fns.items()}, reps=reps)
        floors = {f"floor_{t}": round(layer_floor(n, r, *dims[t]), 3) for t in TARGETS}
        group = []
        for name, ts in times.items():
            ms, ratio = 1000 * median(ts), paired_ratio(ts, times["base"])
            group.append({"variant": name, "N": n, "r": r, "ms": round(ms, 1), "ratio_to_base": round(ratio, 3),
                          "floor_model": round(floor_ratio(n, r, list(TARGETS)), 3), **floors})  # fmt: skip
        group += [{"variant": name, "N": n, "r": r, "error": err} for name, err in failed.items()]
        cols = ["variant", "N", "r", "ms", "ratio_to_base", "floor_model", *floors]
        table(f"prefill {batch}x{seq} tokens, N={n} r={r}: median of {reps} interleaved rounds", cols, group)
        rows += group
        del fns
        gc.collect()
    return {"batch": batch, "tokens": seq, "reps": reps, "targets": list(TARGETS), "rows": rows}
