"""The router warm start (``router.warm_start_method``), before any joint training.

``logistic`` fits every block's gate as a logistic regression of a token's cluster on its block input; ``means``
sets each cluster's gate row from the mean input hidden state of its tokens (nearest-mean routing). Either way the
states are collected with each row routed to its own cluster's expert, so the untrained router routes like the
clusterer; ``auto`` keeps the logistic gates only when they lower held-out loss by ``AUTO_MARGIN``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mole.data.tokenize import eval_batches
from mole.nn.logistic import fit_gate_weights
from mole.nn.model import MoLEModel
from mole.nn.router import RouterOutput, TokenTopKRouter
from mole.nn.spec import find_blocks
from mole.routing.diagnostics import batch_routing, routing_agreement, routing_arrays, row_routing

logger = logging.getLogger(__name__)
WARM = "warm-start"  # its name in progress calls
AUTO_MARGIN = 0.01  # relative held-out loss gain the logistic warm start needs to replace the nearest-mean rule


def _features(hidden: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    """What a gate of pool ``pool`` is linear in: each token's block input (token), or the causal running mean of
    the block inputs of its sequence so far (prefix: the mean of linear logits is the logits of the mean input)."""
    if pool == "token":
        return hidden
    m = mask.to(hidden.device, hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).cumsum(1) / m.cumsum(1).clamp(min=1.0)


@dataclass
class BlockInputs:
    """What one pass over the warm-start rows, each routed to its own expert, gives both rules, per block.

    ``means[b]`` (E, D): mean features of each expert's rows' tokens; ``overall[b]`` (D,): their mean over all tokens
    (both over every token, summed in float64); ``states[b]`` (N, D) float32: the features of N sampled tokens, and
    ``labels`` (N,) int64: the expert of each one's row. Features are a gate's inputs (``_features``).
    """

    means: list[torch.Tensor]
    overall: list[torch.Tensor]
    states: list[np.ndarray]
    labels: np.ndarray
    counts: torch.Tensor  # (E,) tokens of each expert's rows


@torch.no_grad()
def collect_block_inputs(
    model: MoLEModel,
    rows: list[dict[str, Any]],
    experts: list[int],
    *,
    batch_size: int,
    max_length: int,
    max_tokens: int,
    seed: int = 0,
    pool: str = "token",
) -> BlockInputs:
    """Every block's inputs in one forward pass, with every row routed to its own expert (``experts[i]``).

    The routers play no part in a forced pass, so the states are the same whichever gates the model holds: the
    nearest-mean rule (from the means) and the logistic fit (from at most ``max_tokens`` tokens, drawn at random;
    none when 0) share this one pass. With ``pool="prefix"`` a token's features are the running mean of its
    sequence's states up to it (what a prefix-pooled gate is linear in).
    """
    blocks = find_blocks(model.base)
    batches = list(eval_batches(rows, model.tokenizer, batch_size=batch_size, max_length=max_length))
    total = sum(int(b["attention_mask"].sum()) for _, b in batches)
    keep_p = min(1.0, max_tokens / max(total, 1))
    gen = torch.Generator().manual_seed(seed)
    e, d = model.spec.num_experts, model.base.config.hidden_size
    sums = [torch.zeros(e, d, dtype=torch.float64) for _ in blocks]
    counts = torch.zeros(e, dtype=torch.float64)
    states: list[list[torch.Tensor]] = [[] for _ in blocks]
    labels: list[torch.Tensor] = []
    current: dict[str, torch.Tensor] = {}

    def make_hook(b: int):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            mask = current["mask"]  # (B, T) float64
            weighted = _features(hidden.double().cpu(), mask, pool) * mask[..., None]  # (B, T, D), float64
            sums[b].index_add_(0, current["expert"], weighted.sum(1))
            if max_tokens > 0:
                sampled = _features(hidden, mask, pool)[current["keep"].to(hidden.device)]  # (n, D)
                states[b].append(sampled.float().cpu())

        return hook

    handles = [blk.register_forward_pre_hook(make_hook(b), with_kwargs=True) for b, blk in enumerate(blocks)]
    try:
        model.eval()
        dev = next(model.base.parameters()).device
        for idx, batch in batches:
            mask = batch["attention_mask"].bool()
            current["mask"], current["expert"] = mask.double(), torch.tensor([experts[i] for i in idx])
            counts.index_add_(0, current["expert"], current["mask"].sum(1))
            if max_tokens > 0:
                current["keep"] = keep = mask & (torch.rand(mask.shape, generator=gen) < keep_p)
                labels.append(current["expert"][:, None].expand_as(keep)[keep])
            model.routing(batch["input_ids"].to(dev), batch["attention_mask"].to(dev), route=current["expert"])
    finally:
        for h in handles:
            h.remove()
    n = counts.sum()
    return BlockInputs(
        means=[(s / counts.clamp(min=1.0)[:, None]).float() for s in sums],
        overall=[(s.sum(0) / n.clamp(min=1.0)).float() for s in sums],
        states=[torch.cat(s).numpy() if s else np.zeros((0, d), np.float32) for s in states],
        labels=torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
        counts=counts,
    )


def block_inputs(
    model: MoLEModel,
    rows: list[dict[str, Any]],
    experts: list[int],
    *,
    batch_size: int,
    max_length: int,
    max_tokens: int,
    seed: int = 0,
    pool: str = "token",
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per block, the input features of (at most ``max_tokens``, drawn at random) tokens, and their labels.

    Returns:
        ([(N, D) float32 array per block], (N,) int64 labels): :func:`collect_block_inputs`' ``states``, ``labels``.
    """
    data = collect_block_inputs(model, rows, experts, batch_size=batch_size, max_length=max_length,
                                max_tokens=max_tokens, seed=seed, pool=pool)  # fmt: skip
    return data.states, data.labels


def fit_logistic_gates(
    model: MoLEModel,
    rows: list[dict[str, Any]],
    experts: list[int],
    *,
    c: float,
    batch_size: int = 8,
    max_length: int = 128,
    max_tokens: int = 16384,
    seed: int = 0,
) -> list[float]:
    """Initialise every block's gate as a multinomial logistic regression of a token's expert on its block input
    (:func:`logistic_gates` on the inputs of one forced pass over ``rows``); returns every block's token accuracy."""
    data = collect_block_inputs(model, rows, experts, batch_size=batch_size, max_length=max_length,
                                max_tokens=max_tokens, seed=seed, pool=model.spec.pool)  # fmt: skip
    return logistic_gates(model, data, c=c, seed=seed)


def logistic_gates(model: MoLEModel, data: BlockInputs, *, c: float, seed: int = 0) -> list[float]:
    """Set every block's gate to a multinomial logistic regression of a token's expert on its block input.

    Each gate is fit (scikit-learn, L2 strength ``1 / c``, on standardised inputs whose scaling is then folded
    into the gate) to predict, from a token's input hidden state, the cluster of the row it is in. Unlike the
    nearest-mean rule it weighs the directions that separate the clusters against the spread within them, so it
    also gets the per-token decisions right, not only the row averages, and its softmax is calibrated per token.

    Returns:
        Every block's training accuracy (fraction of sampled tokens whose top-1 gate is their row's expert).
    """
    missing = sorted(set(range(model.spec.num_experts)) - set(data.labels.tolist()))
    if missing:
        raise ValueError(f"warm start: experts {missing} have no sampled tokens; every expert needs at least one row")
    jobs = list(zip(model.routers, data.states, strict=True))
    workers = min(len(jobs), max(1, torch.get_num_threads()))
    if workers == 1:
        accuracy = [fit_gate(router, x, data.labels, c=c, seed=seed) for router, x in jobs]
    else:  # the blocks' fits side by side, one BLAS thread each (they are too small to use more well)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
            accuracy = list(pool.map(lambda job: fit_gate(job[0], job[1], data.labels, c=c, seed=seed), jobs))
    logger.info("warm start (logistic, %d tokens): per-block token accuracy %s", len(data.labels), accuracy)
    return accuracy


def fit_gate(router: TokenTopKRouter, x: np.ndarray, labels: np.ndarray, *, c: float, seed: int = 0) -> float:
    """Set ``router``'s gate to a multinomial logistic regression of ``labels`` (N,) on ``x`` (N, D).

    The regression is fit on standardised inputs (block inputs carry large shared offsets and a few huge
    dimensions); the scaling is folded into the gate, whose softmax then equals the regression's probabilities.

    Returns:
        The fraction of the N rows of ``x`` whose top-1 gate is their label.
    """
    weight, bias, accuracy = fit_gate_weights(x, labels, router.num_experts, c=c, seed=seed)
    with torch.no_grad():
        router.gate.weight.copy_(torch.from_numpy(weight))
        if router.gate.bias is not None:
            router.gate.bias.copy_(torch.from_numpy(bias))
        else:
            logger.warning("router gate has no bias: the logistic warm start drops its intercept")
    return round(accuracy, 4)


def eval_loss(model: MoLEModel, rows: list[dict[str, Any]], *, batch_size: int, max_length: int) -> float:
    """Token-weighted mean next-token NLL of the rows' labelled tokens under the model's own routing."""
    return _score(model, rows, None, batch_size=batch_size, max_length=max_length)[0]


@torch.no_grad()
def _score(
    model: MoLEModel, rows: list[dict[str, Any]], experts: list[int] | None, *, batch_size: int, max_length: int
) -> tuple[float, float | None]:
    """``eval_loss`` of the rows and, given each row's expert, the routers' agreement with them (``routing_agreement``
    of the rows' mean gate logits), from the same pass."""
    model.eval()
    dev = next(model.base.parameters()).device
    total, count, parts = 0.0, 0, []
    for _, batch in eval_batches(rows, model.tokenizer, batch_size=batch_size, max_length=max_length):
        routing: list[RouterOutput] = []
        nll, n = model.score(*(batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels")), routing=routing)
        total, count = total + float(nll.sum()), count + int(n.sum())
        if experts is not None:
            parts.append(batch_routing(routing, batch))
    agreement = None if experts is None else routing_agreement(routing_arrays(parts)[1], experts)
    return total / max(count, 1), agreement


def warm_start_gates(
    model: MoLEModel,
    rows: list[dict[str, Any]],
    experts: list[int],
    *,
    method: str,
    c: float,
    batch_size: int,
    max_length: int,
    max_tokens: int,
    seed: int = 0,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Warm-start every gate by ``method``: ``logistic``, ``means`` or ``auto``.

    ``auto`` fits both rules on three quarters of the rows and keeps the logistic fit when its routed model's LM
    loss on the remaining quarter is lower than the nearest-mean rule's by more than ``AUTO_MARGIN`` (relative),
    else the nearest-mean rule (the rows are the warm start's, from the train split). Which rule routes tokens
    better depends on the base: the logistic fit wins where block inputs carry the cluster per token, the nearest
    mean where only a row's average does (as in a random tiny model). Both rules are fit from the block inputs of
    one forced pass over the rows (:func:`collect_block_inputs`).

    ``progress("warm-start", step, steps, held-out loss or NaN)`` is told after each fit and each scoring (two
    steps per rule fitted, one for a fixed rule).

    Returns:
        {"method": the rule used, "heldout_loss": {rule: loss} and "heldout_agreement" (the rule's routing agreement
        with the held-out rows' experts; auto only), and the rule's fit details}.
    """
    tell = progress or (lambda *_: None)

    def collect(rs: list[dict[str, Any]], es: list[int], tokens: int) -> BlockInputs:
        return collect_block_inputs(model, rs, es, batch_size=batch_size, max_length=max_length, max_tokens=tokens,
                                    seed=seed, pool=model.spec.pool)  # fmt: skip

    def fit(rule: str, data: BlockInputs, rs: list[dict[str, Any]], es: list[int]) -> dict[str, Any]:
        if rule == "logistic":
            return {"token_accuracy": logistic_gates(model, data, c=c, seed=seed)}
        return {"temperatures": means_gates(model, data, rs, es, batch_size=batch_size, max_length=max_length)}

    if method != "auto":
        tell(WARM, 0, 1, math.nan)
        out = {"method": method, **fit(method, collect(rows, experts, max_tokens if method == "logistic" else 0),
                                       rows, experts)}  # fmt: skip
        tell(WARM, 1, 1, math.nan)
        return out
    n_val = max(1, len(rows) // 4)
    fit_rows, fit_experts = rows[n_val:], experts[n_val:]
    if len(set(fit_experts)) < model.spec.num_experts:
        logger.warning("warm start: too few rows to hold a quarter out; comparing the rules on their own rows")
        fit_rows, fit_experts = rows, experts
    losses, agreements, details, states = {}, {}, {}, {}
    tell(WARM, 0, 4, math.nan)
    data = collect(fit_rows, fit_experts, max_tokens)
    for i, rule in enumerate(("means", "logistic")):
        details[rule] = fit(rule, data, fit_rows, fit_experts)
        tell(WARM, 2 * i + 1, 4, math.nan)
        loss, agreements[rule] = _score(model, rows[:n_val], experts[:n_val], batch_size=batch_size,
                                        max_length=max_length)  # fmt: skip
        losses[rule] = round(loss, 5)
        tell(WARM, 2 * i + 2, 4, losses[rule])
        states[rule] = {k: v.clone() for k, v in model.routers.state_dict().items()}
    # The nearest-mean rule is the design's; the logistic fit replaces it only when the held-out rows show a gain
    # beyond the noise of a few dozen rows.
    best = "logistic" if losses["logistic"] < losses["means"] * (1 - AUTO_MARGIN) else "means"
    model.routers.load_state_dict(states[best])
    logger.info("warm start: held-out LM loss %s; using %s", losses, best)
    return {"method": best, "heldout_loss": losses, "heldout_agreement": agreements[best], **details[best]}


def warm_start(
    model: MoLEModel, rows: list[dict[str, Any]], experts: list[int], *, batch_size: int = 8, max_length: int = 128
) -> list[float]:
    """Initialise every block's gate from cluster hidden-state means (one forced pass over ``rows``), then calibrate
    its temperature (:func:`means_gates`); returns the fitted temperature of every block."""
    data = collect_block_inputs(model, rows, experts, batch_size=batch_size, max_length=max_length, max_tokens=0,
                                pool=model.spec.pool)  # fmt: skip
    return means_gates(model, data, rows, experts, batch_size=batch_size, max_length=max_length)


def means_gates(
    model: MoLEModel,
    data: BlockInputs,
    rows: list[dict[str, Any]],
    experts: list[int],
    *,
    batch_size: int,
    max_length: int,
) -> list[float]:
    """Set every block's gate from the cluster means of ``data`` (collected over ``rows``), then its temperature.

    A block's input carries the expert deltas of the blocks before it, so some blocks separate the clusters far
    less cleanly than others; a pass over ``rows`` under the warm-started routers fits one temperature per block
    (temperature scaling: the scalar minimising the cross-entropy of the softmax of a row's mean gate logits
    against the row's cluster), so each block's logits carry the confidence it has earned when a row's evidence is
    summed across blocks.

    Returns:
        The fitted temperature of every block.
    """
    if (data.counts == 0).any():
        missing = torch.nonzero(data.counts == 0).flatten().tolist()
        raise ValueError(f"warm start: experts {missing} have no rows; every expert needs at least one row")
    for router, mu, mu_all in zip(model.routers, data.means, data.overall, strict=True):
        router.warm_start(mu.to(router.gate.weight.device), mu_all.to(router.gate.weight.device))
    _, logits = row_routing(model, rows, batch_size=batch_size, max_length=max_length)  # (n, L, E)
    labels = torch.tensor(experts)
    temps = []
    with torch.no_grad():
        for b, router in enumerate(model.routers):
            t = fit_temperature(torch.from_numpy(logits[:, b]), labels)
            router.gate.weight.div_(t)
            if router.gate.bias is not None:
                router.gate.bias.div_(t)
            temps.append(round(t, 4))
    logger.info("warm start: per-block gate temperatures %s", temps)
    return temps


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising cross-entropy(logits / T, labels), by a log-spaced search then a local refinement."""

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits.double() / t, labels))

    grid = torch.logspace(-3, 4, 57).tolist()
    best = min(grid, key=nll)
    fine = (best * torch.logspace(-0.125, 0.125, 21)).tolist()
    return float(min(fine, key=nll))
