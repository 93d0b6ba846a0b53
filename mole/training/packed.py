"""Packed expert training: every cluster's LoRA expert trained in one run over one copy of the base.

A packed step takes the next batch of every expert's own stream (exactly the batches ``train_lora`` would draw
for it), routes each sequence one-hot to its expert through a MoLE bank (``MoLELinear`` with forced routing),
and backpropagates ``sum_i loss_i``, where ``loss_i`` is expert i's mean token loss over its own batch. Expert
i's parameters only see its own sequences, so its gradient is exactly that of its separate run; clipping is by
each expert's own gradient norm, and each expert has its own AdamW (state, step count, lr schedule). The result
is the same training as separate runs, up to float summation order (and dropout draws, when dropout > 0).

Two things make a packed step cheaper than E separate ones: the E*B sequences are sorted by length and run in
forwards of ``rows_per_forward`` sequences, each padded only to its own longest, and the LM head and loss are
computed only at the labelled positions (prompt tokens of prompt/completion rows need no logits).

Shapes: E experts, B batch, T tokens, D hidden, V vocabulary, r rank.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mole.config import BuildConfig
from mole.data.tokenize import IGNORE, collate, labelled_losses, pad_id, train_batches
from mole.nn.adapters import adapter_keys, read_adapter
from mole.nn.packed_bank import PackedBank, peft_init
from mole.sections import ExpertsConfig, LoraSection
from mole.training.checkpoint import checkpoint_dir, remove_stale_temps, resume, save_checkpoint
from mole.training.lora import Job, lr_factor, reuse, run_metrics, write_sealed_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
Progress = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class PackedExpert:
    """One expert of a packed run: the arguments ``train_lora`` would get for it."""

    name: str
    rows: list[dict[str, Any]]
    out_dir: Path
    seed: int
    steps: int
    fingerprint: str


@dataclass
class _Run:
    """Training state of one expert inside a packed run."""

    expert: PackedExpert
    params: dict[str, torch.Tensor]  # peft parameter name -> view into the bank
    optimizer: torch.optim.Optimizer
    state: dict[str, Any]
    start: int
    batches: Iterator[dict[str, torch.Tensor]]


def train_packed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    experts: list[PackedExpert],
    *,
    lora: LoraSection,
    cfg: ExpertsConfig,
    rows_per_forward: int | None = None,
    progress: Progress | None = None,
    init_from: Path | None = None,
    under: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Train all ``experts`` at once and write each to its ``out_dir`` as a standard peft adapter dir.

    Each expert ends as ``train_lora(model, tokenizer, e.rows, lora=lora, cfg=cfg, steps=e.steps,
    out_dir=e.out_dir, seed=e.seed, fingerprint=e.fingerprint)`` would leave it (same init, batches, loss,
    clipping and optimizer), with the same train_metrics.json fields plus ``mode``. Every expert checkpoints to
    ``<out_dir>.ckpt`` in train_lora's format and resumes from it. ``model`` is given back as it was.

    Args:
        model: the base causal LM.
        tokenizer: its tokenizer, with a pad or eos token.
        experts: the experts to train (distinct ``out_dir``).
        lora: LoRA options shared by all experts.
        cfg: optimizer, batching and checkpoint options (``cfg.steps`` ignored in favour of each ``steps``).
        rows_per_forward: sequences per forward pass (gradients accumulate over the forwards of a step); bounds
            activation memory. None: ``cfg.batch_size``, the per-forward memory of one separate run.
        progress: called as ``progress(name, step, steps, loss)`` after every optimizer step of every expert.
        init_from: a peft adapter dir every expert starts from, as in ``train_lora`` (experts.shared = seed).
        under: a peft adapter dir in the bank's shared slot, frozen, beneath every expert (experts.shared = residual).

    Returns:
        Expert name -> the metrics written to its train_metrics.json.
    """
    if not experts or len({e.out_dir for e in experts}) != len(experts):
        raise ValueError(f"experts: expected a non-empty list with distinct out_dir, got {[e.name for e in experts]}")
    chunk = rows_per_forward or cfg.batch_size
    device = next(model.parameters()).device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        inits = [peft_init(model, lora, seed=e.seed) for e in experts]
        if init_from is not None:  # the same draws are made (and discarded), as train_lora makes them
            start = _module_tensors(init_from)
            inits = [(start, config) for _, config in inits]
        torch.manual_seed(experts[0].seed)  # dropout draws of the packed run
        modules = list(inits[0][0])
        with PackedBank(model, lora, num_experts=len(experts), modules=modules, shared=under is not None) as bank:
            if under is not None:
                bank.set_shared(_module_tensors(under))
            runs = [_start(bank, i, e, inits[i], tokenizer, lora, cfg, device) for i, e in enumerate(experts)]
            out = _loop(model, bank, runs, tokenizer, lora, cfg, chunk, device, progress)
    return out


def _module_tensors(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft adapter dir's weights as {module name: (A, B)}."""

    _, flat = read_adapter(directory)
    names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in flat}
    return {n: (flat[adapter_keys(n)[0]], flat[adapter_keys(n)[1]]) for n in sorted(names)}


def _start(
    bank: PackedBank, i: int, e: PackedExpert, init: tuple, tokenizer: Any, lora: LoraSection, cfg: ExpertsConfig,
    device: torch.device,
) -> _Run:  # fmt: skip
    """Load expert i's init (or its checkpoint) into the bank; build its optimizer and batch stream."""
    remove_stale_temps(e.out_dir)
    tensors, peft_config = init
    bank.set_expert(i, tensors)
    params = bank.expert_views(i)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = resume(checkpoint_dir(e.out_dir), params=params, optimizer=optimizer, device=device,
                   fingerprint=e.fingerprint, total_steps=e.steps)  # fmt: skip
    start = 0 if state is None else state["step"]
    if state is None:
        state = {"step": 0, "total_steps": e.steps, "losses": [], "tokens": 0, "seconds": 0.0}
    else:
        logger.info("%s: resuming from its checkpoint at step %d/%d", e.name, start, e.steps)
    state["fingerprint"] = e.fingerprint
    state["peft_config"] = peft_config  # dropped before the state is written anywhere
    batches = train_batches(e.rows, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=e.seed,
                            steps=e.steps)  # fmt: skip
    return _Run(e, params, optimizer, state, start, itertools.islice(batches, start, None))


def _loop(
    model: Any, bank: PackedBank, runs: list[_Run], tokenizer: Any, lora: LoraSection, cfg: ExpertsConfig,
    chunk: int, device: torch.device, progress: Progress | None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The packed training loop, from the earliest resume step to the last expert's last step."""
    out: dict[str, dict[str, Any]] = {}
    pid = pad_id(tokenizer)
    for step in range(min(r.start for r in runs), max(r.expert.steps for r in runs)):
        t0 = time.perf_counter()
        active = [i for i, r in enumerate(runs) if r.start <= step < r.expert.steps]
        batches = {i: next(runs[i].batches) for i in active}
        losses = _forward_backward(model, bank, batches, chunk=chunk, pad=pid, device=device)
        tokens = {i: int(b["attention_mask"].sum()) for i, b in batches.items()}
        dt = time.perf_counter() - t0
        for i in active:
            run, warmup = runs[i], min(cfg.warmup_steps, runs[i].expert.steps)
            bank.attach_grads(i, run.params)
            torch.nn.utils.clip_grad_norm_(run.params.values(), cfg.grad_clip)  # by this expert's own norm
            for group in run.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, run.expert.steps, warmup)
            run.optimizer.step()
            s = run.state
            s["losses"].append(losses[i])
            s["tokens"] += tokens[i]
            # The step's wall time is shared by token count, so tokens/s of every expert is the packed throughput.
            s["step"], s["seconds"] = step + 1, s["seconds"] + dt * tokens[i] / sum(tokens.values())
            if s["step"] % cfg.checkpoint_every == 0 and s["step"] < run.expert.steps:
                ckpt_state = {k: v for k, v in s.items() if k != "peft_config"}
                save_checkpoint(checkpoint_dir(run.expert.out_dir), adapter=run.params, optimizer=run.optimizer,
                                device=device, state=ckpt_state)  # fmt: skip
            if progress is not None:
                progress(run.expert.name, s["step"], run.expert.steps, losses[i])
            if s["step"] == run.expert.steps:
                out[run.expert.name] = _finish(run, lora=lora, cfg=cfg)
        bank.zero_grad()
    for run in runs:  # experts whose checkpoint was already at the end (killed between the last step and the save)
        if run.expert.name not in out:
            out[run.expert.name] = _finish(run, lora=lora, cfg=cfg)
    return out


def _forward_backward(
    model: Any, bank: PackedBank, batches: dict[int, dict[str, torch.Tensor]], *, chunk: int, pad: int,
    device: torch.device,
) -> dict[int, float]:  # fmt: skip
    """Accumulate the gradient of ``sum_i loss_i`` over the experts' batches; return each ``loss_i``.

    ``loss_i`` is the mean next-token loss over the labelled tokens of expert i's batch (as the model's own loss
    is). The sequences of all batches are sorted by length and run ``chunk`` at a time, each forward padded to
    its own longest sequence; right padding changes nothing for the real tokens of a causal LM.
    """
    seqs = []  # (expert, input_ids (n,), labels (n,)) with padding trimmed off
    counts = {}
    for i, b in batches.items():
        counts[i] = max(1, int((b["labels"][:, 1:] != IGNORE).sum()))  # as many tokens as the model's mean divides by
        for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"], strict=True):
            n = int(mask.sum())
            seqs.append((i, ids[:n].tolist(), labels[:n].tolist()))
    seqs.sort(key=lambda s: -len(s[1]))  # stable: ties keep expert order
    totals = dict.fromkeys(batches, 0.0)
    for start in range(0, len(seqs), chunk):
        part = seqs[start : start + chunk]
        batch = collate([{"input_ids": s[1], "labels": s[2]} for s in part], pad_id=pad)
        experts = torch.tensor([s[0] for s in part], device=device)  # (b,) bank index per sequence
        nll = token_losses(model, bank, {k: v.to(device) for k, v in batch.items()}, experts)  # (b, T-1)
        per_seq = nll.sum(1)  # (b,)
        weight = torch.tensor([1.0 / counts[s[0]] for s in part], device=device)  # (b,)
        (per_seq * weight).sum().backward()
        for s, value in zip(part, (per_seq.detach() * weight).tolist(), strict=True):
            totals[s[0]] += value
    return totals


def token_losses(model: Any, bank: PackedBank, batch: dict[str, torch.Tensor], experts: torch.Tensor,
                 first: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Next-token losses of the sequences routed to ``experts`` (b,) (their first tokens to ``first`` (b,), when
    given), (b, T) batch -> (b, T-1) float32, zero at unlabelled positions (``labelled_losses``: the LM head only where
    there are labels)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bank.route(experts, seq_len=ids.shape[1], mask=mask, first=first)
    return labelled_losses(model, ids, mask, batch["labels"])


def _finish(run: _Run, *, lora: LoraSection, cfg: ExpertsConfig) -> dict[str, Any]:
    """Write the expert's adapter dir atomically (metrics last) and drop its checkpoint."""
    e, state = run.expert, run.state
    peft_config = state.pop("peft_config")
    metrics = {
        **run_metrics(state, rows=e.rows, lora=lora, cfg=cfg, seed=e.seed, resumed_from=run.start),
        "mode": "packed",
    }
    tensors = {}
    for name, value in run.params.items():  # base_model.model.<module>.lora_X.default.weight
        module, _, rest = name.removeprefix("base_model.model.").rpartition(".lora_")
        key_a, key_b = adapter_keys(module)
        tensors[key_a if rest.startswith("A") else key_b] = value.detach().cpu().contiguous()
    metrics = write_sealed_adapter(e.out_dir, tensors, peft_config, metrics)
    shutil.rmtree(checkpoint_dir(e.out_dir), ignore_errors=True)
    logger.info("%s: %d steps (packed), final loss %.4f", e.name, e.steps, metrics["final_loss"])
    return metrics


def run_packed(
    cfg: BuildConfig, jobs: list[Job], get_base: Callable[[], tuple], progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Train (or reuse) the experts of ``jobs`` in one packed run over one base; return their experts.json entries.

    An expert already finished with the same inputs is reused, as in separate training; the base is loaded only if
    some expert needs training.
    """
    fingerprints = {j.name: j.fingerprint(cfg) for j in jobs}
    metrics: dict[str, dict[str, Any]] = {}
    for j in jobs:
        if (m := reuse(cfg.path(j.rel_dir), fingerprints[j.name], j.name, j.steps, progress)) is not None:
            metrics[j.name] = m
    todo = [j for j in jobs if j.name not in metrics]
    if todo:
        logger.info("training %d experts packed: %s", len(todo), ", ".join(j.name for j in todo))
        e, fps = cfg.experts, fingerprints
        experts = [PackedExpert(j.name, j.rows, cfg.path(j.rel_dir), j.seed, j.steps, fps[j.name]) for j in todo]
        on = {k: cfg.path(getattr(todo[0], k)) if getattr(todo[0], k) else None for k in ("init_from", "under")}
        metrics |= train_packed(*get_base(), experts, lora=e.lora, cfg=e, progress=progress, **on)
    return [j.entry(fingerprints[j.name], metrics[j.name], reused=j not in todo) for j in jobs]
