"""The warm-start rows of gallery experts (``experts.gallery``: adapters imported with ``mole add-expert``).

A trained expert's gate row is warm-started from its cluster's rows. A gallery expert has no cluster: its rows are
the ones given to ``mole add-expert --rows`` when there are some, else the train rows it serves better than their
own expert does. For those, every row of the warm-start sample is scored with all its tokens routed to its own
expert alone, and to each gallery expert alone (one forced pass per expert); a row goes to the gallery expert with
the lowest loss when that is below its own expert's (a trained expert that would lose every row keeps the one it
loses least, as the fit needs a row of each). A gallery expert that wins no row is never routed to: the fit
gets the one row it came closest on, then its gate row is set so that no token picks it (:func:`never_route`), and
the build says so.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mole.data.tokenize import eval_batches
from mole.nn.model import MoLEModel

logger = logging.getLogger(__name__)

NEVER_BIAS = -1e4  # the gate bias of an expert no token is routed to (far below any learned logit)


@torch.no_grad()
def forced_losses(
    model: MoLEModel, rows: list[dict[str, Any]], routes: list[list[int]], *, batch_size: int, max_length: int
) -> np.ndarray:
    """(len(routes), len(rows)): each row's mean per-token loss with all its tokens routed to ``routes[j][i]``."""
    model.eval()
    dev = next(model.base.parameters()).device
    out = np.zeros((len(routes), len(rows)))
    for idx, batch in eval_batches(rows, model.tokenizer, batch_size=batch_size, max_length=max_length):
        ids, mask, labels = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
        for j, route in enumerate(routes):
            nll, n = model.score(ids, mask, labels, route=torch.tensor([route[i] for i in idx], device=dev))
            out[j, idx] = (nll / n.clamp(min=1)).double().cpu().numpy()
    return out


def warm_start_rows(
    model: MoLEModel,
    gallery: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    experts: list[int],
    *,
    batch_size: int,
    max_length: int,
) -> tuple[list[dict[str, Any]], list[int], dict[str, Any]]:
    """The warm start's rows and labels with the gallery experts' rows in: ``rows``/``experts`` (the trained
    experts' sample, labelled with each row's expert), the rows each gallery expert came with (at most the sample's
    rows per trained expert, so that it weighs in the fit as a cluster does), and rows of the sample
    that a gallery expert without any serves better (relabelled to it). The gallery experts hold the bank slots after
    the trained ones, in ``gallery``'s order.

    Returns:
        (rows, labels, {name: {"slot", "rows", "source": "add-expert --rows" | "served better" | "none"}}).
    """
    first = model.spec.num_experts - len(gallery)
    rows, experts, info = list(rows), list(experts), {}
    scored = [(first + j, g) for j, g in enumerate(gallery) if not g["rows"]]
    won: dict[int, list[int]] = {}
    if scored and rows:
        routes = [experts, *([slot] * len(rows) for slot, _ in scored)]
        loss = forced_losses(model, rows, routes, batch_size=batch_size, max_length=max_length)
        best, wins = loss[1:].argmin(0), loss[1:].min(0) < loss[0]
        won = {slot: [i for i in range(len(rows)) if wins[i] and best[i] == j] for j, (slot, _) in enumerate(scored)}
        own = list(experts)
        for slot, members in won.items():
            for i in members:
                experts[i] = slot
        margin = loss[0] - loss[1:].min(0)  # > 0 where a gallery expert won the row
        for e in sorted(set(own) - set(experts)):  # a trained expert lost every row: it keeps its least-lost one
            i = min((i for i in range(len(own)) if own[i] == e), key=lambda i: margin[i])
            experts[i] = e
        for j, (slot, _) in enumerate(scored):
            if not won[slot]:  # a placeholder for the fit (every gate row needs a row); never_route then resets it
                rows.append(rows[int(np.argmin(loss[1 + j] - loss[0]))])
                experts.append(slot)
    share = max(1, round(len(rows) / max(1, first)))  # a gallery expert's rows weigh as much as a cluster's
    for j, g in enumerate(gallery):
        slot = first + j
        if g["rows"]:
            given = g["rows"][:share]
            rows += given
            experts += [slot] * len(given)
            info[g["name"]] = {"slot": slot, "rows": len(given), "source": "add-expert --rows"}
        else:
            n = len(won.get(slot, []))
            info[g["name"]] = {"slot": slot, "rows": n, "source": "served better" if n else "none"}
    return rows, experts, info


def never_route(model: MoLEModel, slots: list[int]) -> None:
    """Set the gate rows of ``slots`` so that no token is routed to them (zero weights, a bias far below any)."""
    with torch.no_grad():
        for router in model.routers:
            router.gate.weight[slots] = 0.0
            if router.gate.bias is not None:
                router.gate.bias[slots] = NEVER_BIAS
    logger.warning("gallery experts in bank slots %s serve no warm-start row better than its own expert: never "
                   "routed to", slots)  # fmt: skip
