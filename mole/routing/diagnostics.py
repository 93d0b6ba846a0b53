"""Routing diagnostics: which tokens a loss counts, each row's mean routing per block, agreement with the clusters."""

from __future__ import annotations

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


@torch.no_grad()
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
    model.eval()
    weights, logits = [], []
    dev = next(model.base.parameters()).device
    for _, batch in eval_batches(rows, model.tokenizer, batch_size=batch_size, max_length=max_length):
        mask = token_mask(batch, prompt_only).to(dev)[..., None]  # (B, T, 1)
        res = model(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
        weights.append(torch.stack([(o.weights * mask).sum(1) / mask.sum(1) for o in res.routing], 1).cpu())
        logits.append(torch.stack([(o.logits * mask).sum(1) / mask.sum(1) for o in res.routing], 1).cpu())
    return torch.cat(weights).float().numpy(), torch.cat(logits).float().numpy()


def routing_agreement(logits: np.ndarray, experts: list[int]) -> float:
    """Fraction of rows whose router top-1 expert is their own cluster's expert.

    A row's top-1 is the argmax of its gate logits averaged over its tokens and the blocks: the sequence-level
    decision of the same linear gates (for warm-started gates, the nearest cluster mean of the row's mean state).
    """
    top1 = logits.mean(1).argmax(-1)
    return float((top1 == np.asarray(experts)).mean())
