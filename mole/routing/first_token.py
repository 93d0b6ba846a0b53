"""Fitting the first-token gate (``mole.nn.first_gate``, ``router.first_gate``) in train-router, and how often it is
right on a set of rows.

The gate is a multinomial logistic regression of a row's expert on the block-0 input of the row's first token (its
embedding; the first after a BOS where the tokenizer adds one), fitted on the training rows, on standardised inputs
as the logistic warm start is.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mole.nn.first_gate import first_token_features
from mole.nn.logistic import fit_gate_weights
from mole.nn.model import MoLEModel

logger = logging.getLogger(__name__)


def fit_first_gate(
    model: MoLEModel, rows: list[dict[str, Any]], experts: list[int], *, c: float, max_length: int, seed: int = 0
) -> dict[str, Any]:
    """Fit ``model.first_gate`` to route each row's first token to the row's expert (``experts[i]``), L2 strength
    ``1 / c`` (``fit_gate_weights``).

    Returns:
        {"rows", "distinct_first_tokens", "train_accuracy" (rows whose first token the gate sends to their expert)}.
    """
    if model.first_gate is None:
        raise ValueError("the model has no first-token gate (MoLESpec.first_gate is False)")
    x, distinct = first_token_features(model.base, model.tokenizer, rows, max_length=max_length)  # (N, D)
    weight, bias, accuracy = fit_gate_weights(x, np.asarray(experts), model.spec.num_experts, c=c, seed=seed)
    gate = model.first_gate.gate
    with torch.no_grad():
        gate.weight.copy_(torch.from_numpy(weight))
        gate.bias.copy_(torch.from_numpy(bias))
    logger.info("first-token gate: %d rows, %d distinct first tokens, training accuracy %.3f", len(rows), distinct,
                accuracy)  # fmt: skip
    return {"rows": len(rows), "distinct_first_tokens": distinct, "train_accuracy": accuracy}


@torch.no_grad()
def first_gate_agreement(model: MoLEModel, rows: list[dict[str, Any]], experts: list[int], *, max_length: int) -> float:
    """The fraction of ``rows`` whose first token ``model.first_gate`` sends to the row's expert (``experts[i]``)."""
    x, _ = first_token_features(model.base, model.tokenizer, rows, max_length=max_length)
    gate = model.first_gate.gate
    choice = gate(torch.from_numpy(x).to(gate.weight)).argmax(-1).cpu()
    return float((choice == torch.tensor(experts)).double().mean()) if rows else float("nan")
