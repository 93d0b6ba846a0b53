"""The first-token gate: which expert serves each sequence's first token, in every block, chosen from block 0's input.

A token router routes the first token of a sequence from its own hidden state alone; deeper in the stack that state
is nearly the same for every sequence (the attention sink), so the per-block routers send every first token to one
expert, and the loss at that position is where a token router loses to routing each row to its own expert. The
first-token gate is one linear map from the first token's block-0 input (its embedding) to the experts, fitted to
the training rows' experts (``mole.routing.first_token``); its choice routes that token in every block. Causal:
the first token's route depends on that token only (and a BOS before it), and decoding with a KV cache never sees
it again.

Shapes: B batch, T tokens, D hidden, E experts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from mole.data.tokenize import eval_batches
from mole.nn.decode import FirstTokens
from mole.nn.router import RouterOutput, first_tokens
from mole.nn.spec import find_blocks

PREFIX = "first_gate."  # its tensors' keys in router.safetensors, beside the routers'


def split_router_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """router.safetensors' tensors as (the routers', the first-token gate's), each keyed as its module's state dict."""
    gate = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}, gate


def lead_specials(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text's first token (a BOS), in order; [] without one."""
    if tokenizer is None:
        return []
    ids, specials = tokenizer("a")["input_ids"], set(tokenizer.all_special_ids)
    lead = 0
    while lead < len(ids) - 1 and ids[lead] in specials:
        lead += 1
    return list(ids[:lead])


class FirstTokenGate(nn.Module):
    """A linear gate (D -> E) on the first real token's block-0 input; its argmax routes that token in every block.

    With a tokenizer that starts every text with a BOS, the first token after it is the one routed (``lead``: how
    many special tokens come first; they stay with the routers).

    Args:
        dim: D, the hidden size.
        num_experts: E.
        lead: special tokens before a text's first token.
        device: where the gate lives (the base's device).
    """

    def __init__(self, dim: int, num_experts: int, *, lead: int = 0, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, device=device)
        self.lead = lead
        # every block sees the same tokens: tracked once, at block 0; the first token is the one among the first
        # lead + 1 that is not among the first lead
        self._first, self._lead = FirstTokens(lead + 1, 1), FirstTokens(lead, 1) if lead else None
        self._where: torch.Tensor | None = None  # (B, T) the current forward's first tokens, or None: none
        self._choice: torch.Tensor | None = None  # (B,) their experts

    @classmethod
    def of(cls, tokenizer: Any, dim: int, num_experts: int, *, device: Any = None) -> FirstTokenGate:
        """A gate for a model whose texts ``tokenizer`` encodes (its ``lead`` from ``lead_specials``)."""
        return cls(dim, num_experts, lead=len(lead_specials(tokenizer)), device=device)

    def start(self, hidden: torch.Tensor, mask: torch.Tensor | None, continued: bool) -> None:
        """At block 0 of a forward: find each sequence's first token among these (none in a decode step past it) and
        choose its expert from ``hidden`` (B, T, D), block 0's input; ``mask`` (B, T) or None."""
        first = self._first.mark(0, hidden.shape[:2], mask, continued)  # the first lead + 1 real tokens
        lead = None if self._lead is None else self._lead.mark(0, hidden.shape[:2], mask, continued)
        if first is not None and lead is not None:  # (a prompt of a BOS alone: its first token is decoded later)
            first = first & ~lead
        self._where = None if first is None else first.to(hidden.device)
        self._choice = None if first is None else self.choose(hidden, self._where)

    def route(self, out: RouterOutput) -> RouterOutput:
        """A block's routing ``out`` with the first tokens ``start`` found sent to their experts."""
        return out if self._where is None else out.routed_at(self._where, self._choice)

    def choose(self, hidden: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """(B,) the gate's expert for each sequence's marked token (``first`` (B, T), at most one per row)."""
        pos = first.to(torch.uint8).argmax(1).to(hidden.device)  # (B,) a row without one takes its token 0: unused
        x = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]  # (B, D)
        w = self.gate.weight
        return torch.nn.functional.linear(x.to(w.dtype), w, self.gate.bias).argmax(-1)


def first_positions(shape: torch.Size, mask: torch.Tensor | None, lead: int) -> torch.Tensor:
    """(B, T) bool: each sequence's first token after its ``lead`` special tokens (none in a sequence of no more), in a
    forward that starts the sequences."""
    first = first_tokens(lead + 1, shape, mask)[0]
    return first & ~first_tokens(lead, shape, mask)[0] if lead else first


def first_token_ids(rows: list[dict[str, Any]], tokenizer: Any, *, lead: int, max_length: int) -> list[int]:
    """Each row's first token after its ``lead`` special tokens (a BOS) as the model reads it (``eval_batches``'
    encoding; a row with no token after them: its last, which the gate never routes), in row order."""
    ids = [0] * len(rows)
    for idx, batch in eval_batches(rows, tokenizer, batch_size=64, max_length=max_length):
        mask = batch["attention_mask"]
        pos = mask.to(torch.uint8).argmax(1) + (mask.sum(1) - 1).clamp(max=lead)  # (B,) left or right padded
        for i, t in zip(idx, batch["input_ids"][torch.arange(len(idx)), pos].tolist(), strict=True):
            ids[i] = t
    return ids


@torch.no_grad()
def block0_inputs(base: nn.Module, token_ids: list[int], *, lead: list[int], chunk: int = 256) -> torch.Tensor:
    """(U, D) float32: block 0's input for each token of ``token_ids`` as a sequence's first token after the ``lead``
    special tokens (the token's embedding as the base computes it there; no adapter plays a part in it)."""
    block0, seen = find_blocks(base)[0], []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"])[:, len(lead)].float().cpu())  # (n, D)

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    dev = next(base.parameters()).device
    try:
        for start in range(0, len(token_ids), chunk):
            ids = torch.tensor([[*lead, t] for t in token_ids[start : start + chunk]], device=dev)  # (n, lead + 1)
            base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen) if seen else torch.zeros(0, base.config.hidden_size)


def first_token_features(
    base: nn.Module, tokenizer: Any, rows: list[dict[str, Any]], *, max_length: int
) -> tuple[np.ndarray, int]:
    """(N, D) float64: block 0's input at each row's first token (after a BOS), and the number of distinct tokens."""
    lead = lead_specials(tokenizer)
    ids = first_token_ids(rows, tokenizer, lead=len(lead), max_length=max_length)
    unique = sorted(set(ids))
    where = {t: i for i, t in enumerate(unique)}
    return block0_inputs(base, unique, lead=lead)[[where[t] for t in ids]].double().numpy(), len(unique)
