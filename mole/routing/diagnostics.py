"""Routing diagnostics: which tokens a loss counts, each row's mean routing per block, agreement with the clusters."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from mole.data.tokenize import IGNORE, eval_batches
from mole.nn.model import MoLEModel


def token_mask(batch: dict[str, torch.Tensor], prompt_only: bool) -> torch.Tensor:
    """(B, T) float mask of the tokens that count: non-padding, and the prompt only if asked and present."""
    mask = batch["attention_mask"].bool()
    if prompt_only:
        prompt = mask & (batch["labels"] == IGNORE)
        has_prompt = prompt.any(1, keepdim=True)
        mask = torch.where(has_prompt, prompt, mask)
    return mask.float()


def row_routing(
    model: MoLEModel,
    rows: list[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    prompt_only: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row and block, the mean over the row's (prompt) tokens of the router's top-k weights and gate logits.

    Returns:
        (weights, logits), each of shape (n_rows, L, E).
    """
    return row_routings(model, rows, batch_size=batch_size, max_length=max_length, prompt_only=(prompt_only,))[0]


@torch.no_grad()
def row_routings(
    model: MoLEModel, rows: list[dict[str, Any]], *, batch_size: int, max_length: int, prompt_only: tuple[bool, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`row_routing` for each ``prompt_only`` flag, from one routing pass over the rows."""
    model.eval()
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in prompt_only]
    dev = next(model.base.parameters()).device
    for _, batch in eval_batches(rows, model.tokenizer, batch_size=batch_size, max_length=max_length):
        routing = model.routing(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
        for flag, part in zip(prompt_only, parts, strict=True):
            part.append(batch_routing(routing, batch, prompt_only=flag))
    return [routing_arrays(part) for part in parts]


def batch_routing(
    routing: list[Any], batch: dict[str, torch.Tensor], *, prompt_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's part of :func:`row_routing`: from its forward's routing (a RouterOutput per block), the mean over
    each row's (prompt) tokens of the top-k weights and of the gate logits, each (B, L, E) on the CPU. The weights
    leave out the tokens routed to no expert (the sink tokens, ``MoLESpec.sink_tokens``): each row's sum to 1."""
    mask = token_mask(batch, prompt_only).to(routing[0].logits.device)[..., None]  # (B, T, 1)
    parts = []
    for o in routing:
        routed = mask * (o.weights.sum(-1, keepdim=True) > 0)  # (B, T, 1)
        parts.append((o.weights * routed).sum(1) / routed.sum(1).clamp(min=1))
    weights = torch.stack(parts, 1).cpu()
    logits = torch.stack([(o.logits * mask).sum(1) / mask.sum(1) for o in routing], 1).cpu()
    return weights, logits


def routing_arrays(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """The (weights, logits) of :func:`batch_routing` batches, in order, as (n_rows, L, E) float32 arrays."""
    return torch.cat([w for w, _ in parts]).float().numpy(), torch.cat([g for _, g in parts]).float().numpy()


def routing_agreement(logits: np.ndarray, experts: list[int]) -> float:
    """Fraction of rows whose router top-1 expert is their own cluster's expert.

    A row's top-1 is the argmax of its gate logits averaged over its tokens and the blocks: the sequence-level
    decision of the same linear gates (for warm-started gates, the nearest cluster mean of the row's mean state).
    """
    top1 = logits.mean(1).argmax(-1)
    return float((top1 == np.asarray(experts)).mean())


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """A short content hash of the rows (ids and text, in order): whether a recorded routing was measured on them."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def utilization_record(model: MoLEModel, rows: list[dict[str, Any]], weights: np.ndarray) -> dict[str, Any]:
    """What merge-prune's utilization would measure, recorded from a pass already made: the mean routing weight of
    every expert over ``rows`` (all of each row's tokens) and the blocks, for these experts and these rows."""
    return {"expert_ids": list(model.spec.expert_ids), "rows": rows_digest(rows),
            "mean": expert_usage(weights).tolist()}  # fmt: skip


def expert_usage(weights: np.ndarray) -> np.ndarray:
    """(n_rows, L, E) routing weights -> (E,) float64: each expert's mean weight over the rows and the blocks."""
    return weights.astype(np.float64).mean(axis=(0, 1))
