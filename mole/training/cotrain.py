"""Co-trained experts (``experts.shared = cotrained``): the shared LoRA and every cluster's expert in one run.

Experts trained one after another on 1/k of the rows each get 1/k of the optimizer steps, and at equal training
tokens that loses to one LoRA trained on all rows (measured on the demo corpus and on realdev). Here the budget is
spent once, in mixed batches over all rows: each row goes through the shared adapter and its own cluster's expert
(one-hot, as the oracle routes), and one AdamW steps the whole bank. The shared adapter gets every step and every
expert a step whenever its rows are in the batch, so a mixture of k experts costs the training tokens of one LoRA.
The run takes ``experts.shared_steps + k * experts.steps`` steps, the budget of the ``residual`` recipe, with every
adapter training from the first step. (Training the shared adapter alone first, BTM-style, was worse here: demo
oracle loss 0.8589 with its 45 steps first against 0.7836 without.)

The run checkpoints every ``experts.checkpoint_every`` steps (and once at the end, before the adapters are written)
to ``<shared>.ckpt``, so a killed run resumes and ends with the same adapters. Every adapter is written as a standard
peft adapter dir; the shared one last.

Shapes: E experts, r rank, B batch, T tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mole.config import BuildConfig
from mole.data.tokenize import IGNORE, train_batches
from mole.nn.adapters import adapter_keys
from mole.nn.first_gate import first_token_features, lead_specials
from mole.nn.logistic import fit_gate_weights
from mole.nn.packed_bank import PackedBank, peft_init
from mole.sections import ExpertsConfig, LoraSection
from mole.training.checkpoint import checkpoint_dir, remove_stale_temps, resume, save_checkpoint
from mole.training.lora import SHARED_ID, finished_metrics, is_finished, lr_factor, run_metrics, write_sealed_adapter
from mole.training.packed import token_losses

logger = logging.getLogger(__name__)
Progress = Callable[[str, int, int, float], None]


def cotrain_steps(cfg: BuildConfig, k: int) -> int:
    """Optimizer steps of the co-training run: ``shared_steps`` plus ``steps`` per expert, all adapters at once."""
    return cfg.experts.shared_steps + k * cfg.experts.steps


def run_fingerprint(cfg: BuildConfig, groups: dict[int, list[str]]) -> str:
    """What every adapter of the run depends on beyond its own rows: all clusters' rows and the run's steps.

    Args:
        groups: cluster -> the ids of its training rows.
    """
    payload = {"clusters": {str(c): sorted(ids) for c, ids in sorted(groups.items())},
               "steps": cotrain_steps(cfg, len(groups))}  # fmt: skip
    if cfg.experts.sink_tokens:  # (0 leaves the fingerprints of runs from before the option as they were)
        payload["sink_tokens"] = cfg.experts.sink_tokens
    if first_gate_trained(cfg):  # (the same for this option)
        payload["first_gate_c"] = cfg.router.warm_start_c
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def first_gate_trained(cfg: BuildConfig) -> bool:
    """Whether the run trains each row's first token through a first-token gate's expert (``experts.first_gate``)."""
    e = cfg.experts
    return e.first_gate and cfg.router.first_gate and cfg.router.routing == "token_topk" and not e.sink_tokens


def gate_choices(model: Any, tokenizer: Any, rows: list[dict[str, Any]], experts: list[int], *, num_experts: int,
                 c: float, max_length: int, seed: int) -> list[int]:  # fmt: skip
    """The expert a first-token gate fitted on ``rows`` (each to ``experts[j]``) picks for each row's first token:
    the fit train-router makes (``mole.routing.first_token``)."""
    x, _ = first_token_features(model, tokenizer, rows, max_length=max_length)
    weight, bias, accuracy = fit_gate_weights(x, np.asarray(experts), num_experts, c=c, seed=seed)
    logger.info("cotrained: first tokens through the first-token gate's experts (training accuracy %.3f)", accuracy)
    return (x @ weight.T + bias).argmax(1).tolist()


def _bank_params(bank: PackedBank) -> dict[str, torch.nn.Parameter]:
    """The whole bank's trainable tensors by a stable name (checkpoint keys)."""
    out = {}
    for name, layer in bank.layers.items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = layer.lora_A, layer.lora_B
    return out


def _slot(bank: PackedBank, i: int, r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Slot i of the bank as {module: (A (r, d_in), B (d_out, r))}, detached CPU copies."""
    sl = slice(i * r, (i + 1) * r)
    return {n: (layer.lora_A.detach()[sl].cpu().contiguous(), layer.lora_B.detach()[:, sl].cpu().contiguous())
            for n, layer in bank.layers.items()}  # fmt: skip


def write_adapter(out_dir: Path, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], peft_config: Any,
                  metrics: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Write one adapter of the bank (module -> (A, B)) as a sealed peft adapter dir."""
    flat = {}
    for module, (a, b) in tensors.items():
        key_a, key_b = adapter_keys(module)
        flat[key_a], flat[key_b] = a, b
    return write_sealed_adapter(out_dir, flat, peft_config, metrics)


def train_cotrained(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    experts: list[int],
    *,
    num_experts: int,
    lora: LoraSection,
    cfg: ExpertsConfig,
    steps: int,
    ckpt: Path,
    seed: int,
    fingerprint: str,
    progress: Progress | None = None,
    first: list[int] | None = None,
) -> tuple[dict[int, dict], dict[str, Any], Any]:
    """Train the shared adapter and ``num_experts`` experts together; returns (expert slots, run state, LoraConfig).

    Args:
        model: the base causal LM (given back as it was).
        tokenizer: its tokenizer.
        rows: every training row; ``experts[j]`` is row j's bank index in ``[0, num_experts)``.
        experts: the bank index of each row.
        num_experts: E.
        lora: the experts' (and the shared adapter's) LoRA options.
        cfg: optimizer, batching and checkpoint options.
        steps: optimizer steps.
        ckpt: the run's checkpoint directory.
        seed: seeds the inits (shared: ``seed``, expert i: ``seed + 1 + i``), the batch order and dropout.
        fingerprint: identifies the run's inputs; a checkpoint of another run is not resumed.
        progress: called as ``progress("cotrained", step, steps, loss)`` after every step.
        first: the bank index of each row's first token (after a BOS), when it is not the row's (``gate_choices``).

    Returns:
        ``{i: slot tensors for i in range(E)} | {E: the shared slot}``, the run state (losses, tokens, seconds,
        per-expert losses) and peft's LoraConfig of the adapters.
    """
    device = next(model.parameters()).device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        shared_init, peft_config = peft_init(model, lora, seed=seed)
        inits = [peft_init(model, lora, seed=seed + 1 + i)[0] for i in range(num_experts)]
        torch.manual_seed(seed)  # dropout draws
        with PackedBank(model, lora, num_experts=num_experts, modules=list(shared_init), shared=True,
                        sink_tokens=cfg.sink_tokens, lead=len(lead_specials(tokenizer))) as bank:  # fmt: skip
            bank.set_shared(shared_init)
            for i, tensors in enumerate(inits):
                bank.set_expert(i, tensors)
            params = _bank_params(bank)
            optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            state = resume(ckpt, params=params, optimizer=optimizer, device=device, fingerprint=fingerprint,
                           total_steps=steps)  # fmt: skip
            if state is None:
                state = {"step": 0, "total_steps": steps, "losses": [], "expert_losses": {}, "tokens": 0,
                         "seconds": 0.0, "fingerprint": fingerprint}  # fmt: skip
            else:
                logger.info("cotrained: resuming from its checkpoint at step %d/%d", state["step"], steps)
            extra = experts if first is None else [list(pair) for pair in zip(experts, first, strict=True)]
            batches = train_batches(rows, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=seed,
                                    steps=steps, extra=extra)  # fmt: skip
            _loop(bank, model, params, optimizer, islice(batches, state["step"], None), state, cfg=cfg, ckpt=ckpt,
                  device=device, progress=progress)  # fmt: skip
            slots = {i: _slot(bank, i, lora.r) for i in range(num_experts + 1)}
    return slots, state, peft_config


def _step(optimizer: torch.optim.Optimizer, bank: PackedBank, scale: float) -> None:
    """One AdamW step of the bank, the routed experts' update scaled by ``scale`` (their lr is ``scale * lr``).

    AdamW's update (decoupled weight decay included) is linear in the lr, so scaling the step of the experts'
    slices is exactly a step at the scaled lr.
    """
    if scale == 1.0:
        optimizer.step()
    else:
        e = bank.num_experts * bank.lora.r
        before = [(layer.lora_A.detach()[:e].clone(), layer.lora_B.detach()[:, :e].clone())
                  for layer in bank.layers.values()]  # fmt: skip
        optimizer.step()
        with torch.no_grad():
            for (a, b), layer in zip(before, bank.layers.values(), strict=True):
                layer.lora_A[:e] = a + scale * (layer.lora_A[:e] - a)
                layer.lora_B[:, :e] = b + scale * (layer.lora_B[:, :e] - b)
    optimizer.zero_grad(set_to_none=True)


def _expert_losses(state: dict[str, Any], nll: torch.Tensor, counts: torch.Tensor, ids: torch.Tensor, e: int) -> None:
    """Append each expert's loss of this step: the mean token loss of its rows in the batch.

    An expert with no rows in the batch repeats its last value (the batch's loss before its first rows), so every
    expert has one value per step, as a separately trained adapter has.
    """
    sums, tokens = nll.sum(1), counts.float()  # (B,), (B,)
    for i in range(e):
        mine = ids == i
        series = state["expert_losses"].setdefault(str(i), [])
        if mine.any():
            series.append(round(float(sums[mine].sum() / tokens[mine].sum().clamp(min=1)), 5))
        else:
            series.append(series[-1] if series else round(state["losses"][-1], 5))


def _loop(
    bank: PackedBank, model: Any, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
    batches: Iterator[dict[str, Any]], state: dict[str, Any], *, cfg: ExpertsConfig, ckpt: Path,
    device: torch.device, progress: Progress | None,
) -> None:  # fmt: skip
    """The co-training steps from ``state["step"]`` on; checkpoints as it goes and once at the end."""

    steps, warmup = state["total_steps"], min(cfg.warmup_steps, state["total_steps"])
    for batch in batches:
        step, t0 = state["step"], time.perf_counter()
        extra = torch.tensor(batch.pop("extra"), device=device)  # (B,) bank index of each row [, of its first token]
        ids, first = (extra, None) if extra.dim() == 1 else (extra[:, 0], extra[:, 1])
        batch = {k: v.to(device) for k, v in batch.items()}
        nll = token_losses(model, bank, batch, ids, first)  # (B, T-1), zero where unlabelled
        counts = (batch["labels"][:, 1:] != IGNORE).sum(1)  # (B,)
        loss = nll.sum() / counts.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, steps, warmup)
        _step(optimizer, bank, cfg.expert_lr_scale)
        state["losses"].append(float(loss.detach()))
        _expert_losses(state, nll.detach(), counts, ids, bank.num_experts)
        state["tokens"] += int(batch["attention_mask"].sum())
        state["step"], state["seconds"] = step + 1, state["seconds"] + time.perf_counter() - t0
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == steps:
            save_checkpoint(ckpt, adapter=params, optimizer=optimizer, device=device, state=state)
        if progress is not None:
            progress("cotrained", state["step"], steps, state["losses"][-1])


def run_cotrained(
    cfg: BuildConfig, jobs: list[Any], get_base: Callable[[], tuple], progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Train (or reuse) the shared adapter and the experts of ``jobs`` in one co-training run; their index entries.

    ``jobs`` are train-experts' jobs of the shared adapter and of every cluster's expert
    (``mole.training.experts._jobs``).
    They are reused when every one is finished with the same inputs; otherwise the run trains them all.
    """

    fps = {j.name: j.fingerprint(cfg) for j in jobs}
    shared = next(j for j in jobs if j.name == SHARED_ID)
    experts = sorted((j for j in jobs if j.cluster is not None), key=lambda j: j.cluster)
    out = {j.name: cfg.path(j.rel_dir) for j in jobs}
    reused = all(is_finished(out[j.name], fps[j.name]) for j in jobs)
    if reused:
        logger.info("cotrained: reusing the shared adapter and %d experts (same inputs)", len(experts))
        metrics = {j.name: finished_metrics(out[j.name]) for j in jobs}
        if progress is not None:
            progress("cotrained", shared.steps, shared.steps, metrics[SHARED_ID]["final_loss"])
    else:
        metrics = _train_and_write(cfg, shared, experts, out, fps, get_base, progress)
    return [j.entry(fps[j.name], metrics[j.name], reused=reused) for j in jobs]


def _train_and_write(
    cfg: BuildConfig, shared: Any, experts: list[Any], out: dict[str, Path], fps: dict[str, str],
    get_base: Callable[[], tuple], progress: Progress | None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """One co-training run, then every adapter dir written (the experts first, the shared one last)."""

    index = {j.cluster: i for i, j in enumerate(experts)}
    rows, ids = [], []
    for j in experts:
        rows += j.rows
        ids += [index[j.cluster]] * len(j.rows)
    ckpt = checkpoint_dir(out[SHARED_ID])
    for path in out.values():
        remove_stale_temps(path)
    logger.info("cotrained: the shared adapter and %d experts on %d rows for %d steps", len(experts), len(rows),
                shared.steps)  # fmt: skip
    e = cfg.experts
    base, tokenizer = get_base()
    first = gate_choices(base, tokenizer, rows, ids, num_experts=len(experts), c=cfg.router.warm_start_c,
                         max_length=e.max_length, seed=cfg.seed) if first_gate_trained(cfg) else None  # fmt: skip
    slots, state, peft_config = train_cotrained(
        base, tokenizer, rows, ids, num_experts=len(experts), lora=e.lora, cfg=e, steps=shared.steps,
        ckpt=ckpt, seed=cfg.seed, fingerprint=fps[SHARED_ID], progress=progress, first=first,
    )  # fmt: skip
    metrics = {}
    for j in [*experts, shared]:
        i = len(experts) if j is shared else index[j.cluster]
        own = state if j is shared else {**state, "losses": state["expert_losses"][str(i)]}
        own = {**own, "fingerprint": fps[j.name], "tokens": _tokens(state, j, rows)}
        m = {**run_metrics(own, rows=j.rows, lora=e.lora, cfg=e, seed=cfg.seed + (0 if j is shared else 1 + i),
                        resumed_from=0), "mode": "cotrained", "run_steps": shared.steps}  # fmt: skip
        metrics[j.name] = write_adapter(out[j.name], slots[i], peft_config, m)
    shutil.rmtree(ckpt, ignore_errors=True)
    logger.info("cotrained: %d steps, final loss %.4f", shared.steps, state["losses"][-1])
    return metrics


def _tokens(state: dict[str, Any], job: Any, rows: list[dict[str, Any]]) -> int:
    """Training tokens to record for ``job``: the whole run's for the shared adapter, the row share for an expert."""
    if job.cluster is None:
        return int(state["tokens"])
    return round(state["tokens"] * len(job.rows) / max(1, len(rows)))
