"""Decoding helpers of MoLEModel: experts merged into the base weights for a request, compiled blocks.

Shapes: E experts, B batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mole.nn.layer import MoLELinear
from mole.nn.router import first_tokens


@contextlib.contextmanager
def merged(layers: list[MoLELinear], expert_weights: torch.Tensor) -> Iterator[None]:
    """Fold ``W + scale * sum_i w_i B_i A_i`` (plus the shared expert) into every layer for the block.

    On exit (also after an error) every layer gets its original weight tensor back: kept, not recovered by subtraction.

    Args:
        layers: the bank's layers.
        expert_weights: (E,) one weight per routed expert.
    """
    try:
        for layer in layers:
            layer.merge(expert_weights)
        yield
    finally:
        for layer in layers:
            layer.unmerge()


def one_expert(
    route: torch.Tensor | None, layers: list[MoLELinear], num_experts: int
) -> contextlib.AbstractContextManager:
    """``merged`` with expert ``route[0]`` when one expert routes every sequence (and the base weights are float);
    else a context that does nothing.

    Args:
        route: (B,) the expert each sequence is forced to, or None (token routing).
        layers: the bank's layers.
        num_experts: E.
    """
    if route is None or route.numel() == 0 or not bool((route == route[0]).all()):
        return contextlib.nullcontext()
    if not all(layer.base_layer.weight.is_floating_point() for layer in layers):
        return contextlib.nullcontext()  # a quantised base: keep the unmerged path
    return merged(layers, torch.nn.functional.one_hot(route[0].long().cpu(), num_experts).float())


def compile_blocks(blocks: nn.ModuleList, **options: Any) -> None:
    """``torch.compile`` each block's forward (``dynamic=True`` unless given); hooks on the blocks stay eager."""
    options.setdefault("dynamic", True)
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)


def continues(kwargs: dict[str, Any], b: int) -> bool:
    """Whether a decoder layer's forward (its ``kwargs``) continues its sequences: block ``b``'s KV cache holds earlier
    tokens (a decode step). The cache is ``past_key_values`` up to transformers 5.2x, ``cache`` since."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache is not None and cache.get_seq_length(b) > 0


class FirstTokens:
    """Marks the first ``n`` real tokens of every sequence, block by block, across the forwards of a decode.

    A fresh forward starts every sequence; a continued one (a KV cache holds earlier tokens) carries on from the
    real tokens each sequence had, until every sequence is past its first ``n`` (then nothing is marked or counted).
    """

    def __init__(self, n: int, blocks: int) -> None:
        self.n = n
        self._seen: list[torch.Tensor | None] = [None] * blocks  # (B,) real tokens so far, while some are under n

    def mark(self, b: int, shape: torch.Size, mask: torch.Tensor | None, continued: bool) -> torch.Tensor | None:
        """(B, T) bool, True at the first ``n`` real tokens among these of block ``b``; None when there are none."""
        if continued and self._seen[b] is None:
            return None
        first, seen = first_tokens(self.n, shape, mask, self._seen[b] if continued else None)
        self._seen[b] = seen if seen.numel() and int(seen.min()) < self.n else None
        return first
