"""Router gates for experts added since the previous build (an incremental build, :mod:`mole.training.lifecycle`):
the previous gates stay as they were for the experts they already route to, and each new expert's gate row is fitted
against them (:func:`extend_gates`), rather than warm-starting every gate anew.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import torch

from mole.nn.model import MoLEModel
from mole.nn.router import TokenTopKRouter
from mole.routing.warm_start import collect_block_inputs

logger = logging.getLogger(__name__)


def fit_new_rows(router: TokenTopKRouter, x: np.ndarray, labels: np.ndarray, *, kept: int, c: float) -> float:
    """Fit the gate rows ``kept:`` of ``router`` (new experts) by a logistic regression of ``labels`` on ``x``, with
    the rows ``:kept`` (the experts a previous build's router already routes to) held fixed, exactly.

    The loss is the multinomial cross-entropy of the whole gate's softmax, so a new row learns to win its own
    tokens against the kept rows as they are, plus the L2 penalty of :func:`fit_gate` (strength ``1 / c``) on the new
    rows only. It is convex in the new rows; L-BFGS solves it on standardised inputs, and the scaling is folded
    back into the gate.

    Returns:
        The fraction of the N rows of ``x`` whose top-1 gate is their label, after the fit.
    """
    w_old = router.gate.weight.detach().double().cpu()[:kept]  # (kept, D)
    b_old = router.gate.bias.detach().double().cpu()[:kept] if router.gate.bias is not None else torch.zeros(kept)
    xs = torch.from_numpy(x).double()
    mean, scale = xs.mean(0), xs.std(0).clamp(min=1e-6)
    z, y = (xs - mean) / scale, torch.from_numpy(labels).long()
    fixed = z @ (w_old * scale).T + (b_old + w_old @ mean)  # (N, kept): the kept rows' logits, unchanged
    n_new = router.num_experts - kept
    w = torch.zeros(n_new, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_new, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    penalty = 1.0 / (2.0 * c * len(y))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.cat([fixed, z @ w.T + b], dim=1)
        loss = torch.nn.functional.cross_entropy(logits, y) + penalty * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        weight = w / scale  # the gate sees unstandardised inputs
        bias = b - weight @ mean
        router.gate.weight[kept:] = weight.to(router.gate.weight)
        if router.gate.bias is not None:
            router.gate.bias[kept:] = bias.to(router.gate.bias)
        logits = torch.cat([fixed, z @ w.T + b], dim=1)
    return round(float((logits.argmax(1) == y).double().mean()), 4)


def extend_gates(
    model: MoLEModel,
    previous: dict[str, torch.Tensor],
    rows: list[dict[str, Any]],
    experts: list[int],
    *,
    c: float,
    batch_size: int,
    max_length: int,
    max_tokens: int,
    max_rows: int,
    seed: int = 0,
) -> dict[str, Any]:
    """The previous build's gates for its experts (the first rows of every gate, kept exactly), and a row fitted for
    each expert added since (:func:`fit_new_rows`, on the block inputs of one forced pass over at most ``max_rows``
    of ``rows``, taken in turn from each expert's, so a new expert's rows are there however the data are ordered).

    ``previous`` is the previous router's state dict, whose gates have fewer rows than this model's.

    Returns:
        {"kept_rows": rows kept, "added_rows": the new experts' indices, "token_accuracy": per block, after the fit}.
    """
    state = model.routers.state_dict()
    kept = 0
    for key, old in previous.items():
        new = state[key]
        if old.shape[1:] != new.shape[1:] or old.shape[0] > new.shape[0]:
            raise ValueError(f"router {key}: previous shape {tuple(old.shape)} does not fit {tuple(new.shape)}")
        kept = old.shape[0]
        new[:kept] = old.to(new)
    model.routers.load_state_dict(state)
    by: dict[int, list[int]] = {}
    for i, e in enumerate(experts):
        by.setdefault(e, []).append(i)
    turns = [i for group in itertools.zip_longest(*by.values()) for i in group if i is not None][:max_rows]
    rows, experts = [rows[i] for i in turns], [experts[i] for i in turns]
    data = collect_block_inputs(model, rows, experts, batch_size=batch_size, max_length=max_length,
                                max_tokens=max_tokens, seed=seed, pool=model.spec.pool)  # fmt: skip
    added = list(range(kept, model.spec.num_experts))
    missing = sorted(set(added) - set(data.labels.tolist()))
    if missing:
        raise ValueError(f"router warm start: new experts {missing} have no sampled tokens")
    accuracy = [fit_new_rows(router, x, data.labels, kept=kept, c=c)
                for router, x in zip(model.routers, data.states, strict=True)]  # fmt: skip
    logger.info("router: %d gate rows kept, rows %s fitted; per-block token accuracy %s", kept, added, accuracy)
    return {"kept_rows": kept, "added_rows": added, "token_accuracy": accuracy}
