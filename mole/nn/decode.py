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
