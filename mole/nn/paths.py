"""The expert bank's compute path for ``path="auto"``: dense (all E experts, two matmuls) or sparse (gather the top-k).

Which is faster depends on the shape and the hardware (a gather of K slices per token beats two small matmuls over all
E on some CPUs for a decode step, rarely on a GPU). So for small steps the choice is measured: the first time a shape
is seen outside autograd, both paths run a few times on the real input and the faster is kept for that shape, in this
process. Larger steps, and any step under autograd or ``torch.compile``, take the rule of ``choose_path``; a single
token takes the sparse path when K <= E / 2 (see ``pick``).

Shapes: N tokens, E experts, K experts per token, S bank slots, r rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Path = Literal["dense", "sparse"]

# The rule (when not measured): the sparse path gathers K (r x d) slices per token, which only beats two dense matmuls
# over all E experts when few experts are used and there are few tokens.
SPARSE_MIN_EXPERTS_PER_TOPK = 8
SPARSE_MAX_TOKENS = 64
MEASURE_REPS = 5  # timed calls of each path; the faster minimum wins

_measured: dict[tuple, Path] = {}


def choose_path(num_experts: int, top_k: int, tokens: int) -> Path:
    """The rule for ``path="auto"`` without a measurement: sparse for small steps with many experts.

    Args:
        num_experts: E.
        top_k: K.
        tokens: B * T tokens in this forward.

    Returns:
        "sparse" when E / K >= 8 and B * T <= 64, else "dense".
    """
    if num_experts / top_k >= SPARSE_MIN_EXPERTS_PER_TOPK and tokens <= SPARSE_MAX_TOKENS:
        return "sparse"
    return "dense"


def shape_key(x: torch.Tensor, *, slots: int, top_k: int, r: int, d_out: int) -> tuple:
    """What the choice depends on: device, dtype, S, K, r, d_in, d_out and N rounded up to a power of two."""
    tokens = x.numel() // x.shape[-1]
    return (x.device.type, x.dtype, slots, top_k, r, x.shape[-1], d_out, 1 << max(tokens - 1, 0).bit_length())


def pick(key: tuple, tokens: int, num_experts: int, top_k: int, run: Callable[[Path], object]) -> Path:
    """The path for this shape: measured once (small steps, no autograd, not compiling), else the rule.

    Args:
        key: ``shape_key`` of the input.
        tokens: N.
        num_experts: E.
        top_k: K.
        run: computes the layer's expert output by the given path (called only to time it).
    """
    if key in _measured:
        return _measured[key]
    if tokens == 1 and 2 * top_k <= num_experts:
        # One token reads its K slots of the bank, not all E: in a real decode step the bank comes from memory, which
        # a timing of the layer alone (bank in cache) does not see; measured in whole decode steps, this wins.
        return "sparse"
    if tokens > SPARSE_MAX_TOKENS or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return choose_path(num_experts, top_k, tokens)
    best = {path: _fastest(run, path, key[0]) for path in ("dense", "sparse")}
    _measured[key] = min(best, key=best.get)
    logger.debug("bank path for %s: %s (dense %.1f us, sparse %.1f us)", key, _measured[key],
                 1e6 * best["dense"], 1e6 * best["sparse"])  # fmt: skip
    return _measured[key]


def _fastest(run: Callable[[Path], object], path: Path, device_type: str) -> float:
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    run(path)  # warm-up
    times = []
    for _ in range(MEASURE_REPS):
        sync()
        start = time.perf_counter()
        run(path)
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def measured() -> dict[tuple, Path]:
    """The choices measured so far in this process, shape key -> path (a copy)."""
    return dict(_measured)


def forget() -> None:
    """Drop every measured choice (the next small step of each shape measures again)."""
    _measured.clear()
