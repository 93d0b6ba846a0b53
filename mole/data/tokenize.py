"""Turning prepared rows into token batches for training and scoring.

Prompt/completion rows are encoded as ``tok(prompt) + tok(sep + completion) + [eos]`` with the labels of the
prompt tokens set to -100, so the loss is on the completion only and generation from ``tok(prompt)`` continues
exactly where training did. Text rows are encoded whole, loss on every token.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

IGNORE = -100


def completion_sep(prompt: str) -> str:
    """Text placed between a prompt and its completion: nothing after whitespace, else one space."""
    return "" if not prompt or prompt[-1].isspace() else " "


def encode_row(tokenizer: Any, row: dict[str, Any], *, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one row, truncated to ``max_length`` (the prompt is cut from the left)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "prompt" in row:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        comp_ids = tokenizer(completion_sep(row["prompt"]) + row["completion"], add_special_tokens=False)["input_ids"]
        comp_ids = (comp_ids + eos)[:max_length]
        prompt_ids = prompt_ids[-(max_length - len(comp_ids)) :] if len(comp_ids) < max_length else []
        return {"input_ids": prompt_ids + comp_ids, "labels": [IGNORE] * len(prompt_ids) + comp_ids}
    ids = (tokenizer(row["text"], add_special_tokens=True)["input_ids"] + eos)[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def collate(encoded: list[dict[str, list[int]]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded rows into tensors: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer: Any) -> int:
    """The id used for padding (the pad token, else eos, else 0)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def train_batches(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    steps: int,
    extra: list[Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield ``steps`` batches, cycling through the rows in a fresh seeded order each epoch.

    If ``extra`` is given (one value per row, e.g. cluster ids), each batch carries ``batch["extra"]``.
    """
    if not rows:
        raise ValueError("no rows to train on")
    rng = random.Random(seed)
    encoded = [encode_row(tokenizer, r, max_length=max_length) for r in rows]
    order: list[int] = []
    pid = pad_id(tokenizer)
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order.extend(epoch)
        take, order = order[:batch_size], order[batch_size:]
        batch: dict[str, Any] = collate([encoded[i] for i in take], pad_id=pid)
        if extra is not None:
            batch["extra"] = [extra[i] for i in take]
        yield batch


def eval_batches(
    rows: list[dict[str, Any]], tokenizer: Any, *, batch_size: int, max_length: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield (row indices, batch) over all rows in order, for scoring."""
    pid = pad_id(tokenizer)
    for start in range(0, len(rows), batch_size):
        idx = list(range(start, min(start + batch_size, len(rows))))
        yield idx, collate([encode_row(tokenizer, rows[i], max_length=max_length) for i in idx], pad_id=pid)


def encode_prompts(tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompts tokenized together for generation: left-padded, so every row's next token comes at the end."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side


def completions(tokenizer: Any, prompts: list[str], generated: torch.Tensor, prompt_len: int) -> list[str]:
    """The decoded completions of ``generated`` (B, prompt_len + new) without the separator training put
    between prompt and completion (``completion_sep``)."""
    texts = tokenizer.batch_decode(generated[:, prompt_len:], skip_special_tokens=True)
    return [t.removeprefix(completion_sep(p)) for p, t in zip(prompts, texts, strict=True)]


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of each row's labelled tokens and their count, in float32.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, ``IGNORE`` where a token is not scored.

    Returns:
        (nll, count), each (B,).
    """
    target = labels[:, 1:]  # (B, T-1): token t+1 is predicted from position t
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V): rows of V contiguous, as scored
    nll = torch.nn.functional.cross_entropy(flat, target.clamp(min=0).reshape(-1), reduction="none")
    keep = target != IGNORE
    return (nll.view(target.shape) * keep).sum(1), keep.sum(1)


def labelled_losses(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Next-token losses of a causal LM, (B, T) batch -> (B, T-1) float32, zero at unlabelled positions.

    The LM head runs only at the labelled positions when the model is a plain decoder + linear head (no logit
    scaling or soft-capping; a peft model whose head is not adapted counts): prompt tokens of prompt/completion rows
    need no logits. Otherwise the full forward gives the logits. The hidden states are the same either way.
    """
    target = labels[:, 1:]  # (B, T-1): token t+1 is predicted from position t
    keep = target != IGNORE
    head, decoder, cfg = model.get_output_embeddings(), model.get_decoder(), model.config
    plain_head = isinstance(head, torch.nn.Linear) and decoder is not None and decoder is not model
    if plain_head and all(getattr(cfg, a, None) in (None, 1.0) for a in ("final_logit_softcapping", "logit_scale")):
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep]).float()  # (M, V) at the M labelled positions only
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits[:, :-1][keep].float()  # (M, V)
    nll = torch.zeros(target.shape, device=logits.device, dtype=torch.float32)
    return nll.masked_scatter(keep, torch.nn.functional.cross_entropy(logits, target[keep], reduction="none"))


def row_losses(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_nll`` of a causal LM's batch, with the LM head only at the labelled positions (``labelled_losses``)."""
    return labelled_losses(model, input_ids, attention_mask, labels).sum(1), (labels[:, 1:] != IGNORE).sum(1)
