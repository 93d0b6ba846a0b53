"""Shared pieces of the benchmark suite: the model, shared-weight copies, expert adapters, timing, tables, JSON.

Every case measures its variants on one base model in one process and interleaves them (one call of each variant
per round), so slow drifts of the machine's load hit every variant alike. Times are medians over rounds; ratios to the
base are medians of the per-round ratios.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = "smollm2-135m-instruct"
TARGETS = ("q_proj", "v_proj")  # the demo preset's expert modules
console = Console(width=None if sys.stdout.isatty() else 150)  # piped: wide enough for the tables
# On a GPU every case runs there in bf16 (timed between torch.cuda.synchronize calls); on CPU in fp32.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def load_model() -> tuple[torch.nn.Module, Any, str]:
    """SmolLM2-135M-Instruct with its real weights when cached, else random weights of its config.

    The model is on ``DEVICE`` in ``DTYPE`` (a GPU when there is one, in bf16).

    Returns:
        ``(model in eval mode, tokenizer, what the weights are)``.
    """
    from mole.base import build_tiny, demo_is_cached

    where = f"{str(DTYPE).removeprefix('torch.').replace('float32', 'fp32').replace('bfloat16', 'bf16')}, {DEVICE.type}"
    if demo_is_cached():
        from mole.base import load_base

        model, tok = load_base(DEMO)
        return model.to(DEVICE, DTYPE).eval(), tok, f"SmolLM2-135M-Instruct (real weights, {where})"
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.layer import DEMO_SHAPES

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**DEMO_SHAPES))
    _, tok = build_tiny()  # byte tokenizer: its ids are valid ids of the 49152-token vocabulary
    return model.to(DEVICE, DTYPE).eval(), tok, f"SmolLM2-135M architecture, random weights (not cached), {where}"


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its own module tree but the very same parameter and buffer tensors.

    Variants that rewrite the module tree (peft, MoLE) each get one, so all of them run on one set of weights.
    """
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def make_adapters(model: torch.nn.Module, root: Path, *, n: int, r: int, seed: int = 0) -> list[Path]:
    """Write ``n`` peft LoRA adapters with random, non-zero A and B (alpha = 2r) under ``root``; return their dirs."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), task_type="CAUSAL_LM")
            peft_model = get_peft_model(shared_copy(model), cfg)
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.02)
        dirs.append(root / f"expert_{i:02d}")
        peft_model.save_pretrained(str(dirs[-1]))
    return dirs


def sync() -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so that a wall-clock reading covers it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], *, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function once per round, ``reps`` rounds after ``warmup`` untimed ones; seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for rnd in range(warmup + reps):
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if rnd >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    """The median of a list of floats."""
    return statistics.median(xs)


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``times[i] / base[i]``: each round's pair ran back to back, so load bursts cancel."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def table(title: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Print rows (dicts keyed by ``columns``) as a rich table."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in ("variant", "mode", "stage") else "right")
    for row in rows:
        t.add_row(*(_fmt(row.get(c)) for c in columns))
    console.print(t)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), or None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return names[0] if names else None


def environment(weights: str | None = None) -> dict[str, Any]:
    """Hardware and software the numbers come from."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),  # results can differ by CPU: MKL and oneDNN pick kernels by what they find
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": DEVICE.type,
        "dtype": str(DTYPE).removeprefix("torch."),
        "weights": weights,
    }


def write_result(name: str, mode: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """Write ``<out_dir>/<mode>/<name>.json`` and say so."""
    path = out_dir / mode / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"[dim]wrote {path}[/]")
    return path
