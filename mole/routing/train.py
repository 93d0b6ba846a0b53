"""Joint router + expert fine-tuning, and routing diagnostics (the warm start before it: ``warm_start``).

Joint training trains gates (``router.lr``) and experts (``router.expert_lr``, or frozen) end to end with the
Switch load-balancing loss and the optional router z-loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from mole.data.tokenize import train_batches
from mole.nn.model import MoLEModel
from mole.sections import RouterConfig

logger = logging.getLogger(__name__)
Progress = Callable[[str, int, int, float], None]


def joint_train(
    model: MoLEModel,
    rows: list[dict[str, Any]],
    cfg: RouterConfig,
    *,
    max_length: int,
    seed: int,
    progress: Progress | None = None,
    frozen: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Train routers and (unless frozen) experts end to end; returns per-step losses and timings.

    ``frozen``: bank slots whose experts get no update (an incremental build's reused experts), their gradients
    zeroed; with weight decay 0 AdamW then leaves them exactly as they were.
    """
    torch.manual_seed(seed)
    handles = _freeze_slots(model, frozen)
    try:
        return _joint_train(model, rows, cfg, max_length=max_length, seed=seed, progress=progress)
    finally:
        for h in handles:
            h.remove()


def _freeze_slots(model: MoLEModel, slots: tuple[int, ...]) -> list[Any]:
    """Gradient hooks that zero the bank slices of ``slots`` (rows of lora_A (S*r, d_in), columns of lora_B)."""
    handles = []
    for layer in model.bank.values() if slots else ():
        keep = torch.ones(layer.lora_A.shape[0])
        for i in slots:
            keep[i * layer.r : (i + 1) * layer.r] = 0
        handles.append(layer.lora_A.register_hook(lambda g, m=keep[:, None]: g * m.to(g)))
        handles.append(layer.lora_B.register_hook(lambda g, m=keep[None, :]: g * m.to(g)))
    return handles


def _joint_train(
    model: MoLEModel,
    rows: list[dict[str, Any]],
    cfg: RouterConfig,
    *,
    max_length: int,
    seed: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    groups = [{"params": model.router_parameters(), "lr": cfg.lr}]
    for p in model.expert_parameters():
        p.requires_grad_(not cfg.freeze_experts and cfg.expert_lr > 0)
    if not cfg.freeze_experts and cfg.expert_lr > 0:
        groups.append({"params": model.expert_parameters(), "lr": cfg.expert_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(cfg.steps, 1))))
    dev = next(model.base.parameters()).device
    model.train()
    hist: dict[str, list[float]] = {"loss": [], "lm_loss": [], "aux_loss": [], "z_loss": []}
    tokens, start = 0, time.perf_counter()
    batches = train_batches(
        rows, model.tokenizer, batch_size=cfg.batch_size, max_length=max_length, seed=seed, steps=cfg.steps
    )
    for step, batch in enumerate(batches, start=1):
        out = model(
            batch["input_ids"].to(dev),
            batch["attention_mask"].to(dev),
            batch["labels"].to(dev),
            aux_loss_coef=cfg.aux_loss_coef,
            z_loss_coef=cfg.z_loss_coef,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        tokens += int(batch["attention_mask"].sum())
        for key in hist:
            hist[key].append(round(float(getattr(out, key).detach()), 5))
        if progress:
            progress("joint", step, cfg.steps, hist["loss"][-1])
    model.eval()
    seconds = time.perf_counter() - start
    return {
        **hist,
        "steps": cfg.steps,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
    }
