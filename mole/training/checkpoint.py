"""Resumable training checkpoints: adapter tensors, AdamW state and RNG state as safetensors, never pickle.

A checkpoint is a directory ``<out_dir>.ckpt/`` beside the final output, written atomically (temp dir + rename):

    adapter.safetensors     the trainable tensors, keyed by their parameter names
    optimizer.safetensors   ``exp_avg/<name>``, ``exp_avg_sq/<name>``, ``step/<name>`` and ``rng/cpu`` (+ ``rng/cuda``)
    state.json              step, total_steps, losses, tokens, seconds, fingerprint (written last)
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mole.io import atomic_dir, recover_one, write_json

logger = logging.getLogger(__name__)

_ADAPTER = "adapter.safetensors"
_OPTIMIZER = "optimizer.safetensors"
_STATE = "state.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``state`` is state.json; tensors are on the CPU."""

    state: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        """Optimizer steps completed when the checkpoint was written."""
        return int(self.state["step"])


def checkpoint_dir(out_dir: Path) -> Path:
    """The checkpoint directory of a training output: the sibling ``<out_dir>.ckpt``."""
    return out_dir.with_name(f"{out_dir.name}.ckpt")


def remove_stale_temps(out_dir: Path) -> None:
    """Delete temp dirs a killed writer of ``out_dir`` (or of its checkpoint) left behind.

    Only one job trains a given output at a time, so any ``.mole-tmp-<name>.*`` beside it is garbage, once a
    previous version a killed swap left aside (``.old``) is put back in place of a missing output or checkpoint.
    """
    for target in (out_dir, checkpoint_dir(out_dir)):
        recover_one(target)
    if out_dir.parent.is_dir():
        for tmp in out_dir.parent.glob(f".mole-tmp-{out_dir.name}.*"):
            logger.debug("removing stale temp %s", tmp)
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng/cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng/cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore the torch RNG states saved by `save_checkpoint` (dropout draws continue where they stopped)."""
    torch.set_rng_state(tensors["rng/cpu"])
    if device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]
) -> dict[str, torch.Tensor]:
    """Flatten an optimizer's per-parameter state to ``{"<key>/<param name>": tensor}``."""
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {key!r} of {names[param]} is {type(value).__name__}, not a tensor")
            out[f"{key}/{names[param]}"] = value.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str], tensors: dict[str, torch.Tensor]
) -> None:
    """Inverse of `optimizer_tensors`: load the flat tensors back as the optimizer's state."""
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        key, _, name = flat.partition("/")
        if key != "rng":
            per_param.setdefault(name, {})[key] = value
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state_dict = optimizer.state_dict()
    # load_state_dict keys state by the parameter's position and casts it to the parameter's device and dtype.
    state_dict["state"] = {i: per_param[names[p]] for i, p in enumerate(params) if names[p] in per_param}
    optimizer.load_state_dict(state_dict)


def save_checkpoint(
    ckpt: Path,
    *,
    adapter: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    state: dict[str, Any],
) -> None:
    """Write a checkpoint directory atomically; state.json goes last so its presence means complete.

    Args:
        ckpt: the checkpoint directory (replaced).
        adapter: the trainable parameters by name (the optimizer's parameters).
        optimizer: an optimizer whose state holds only tensors (AdamW, Adam, SGD with momentum).
        device: the training device, for its RNG state.
        state: JSON-able progress (step, total_steps, losses, tokens, seconds, fingerprint).
    """
    names = {p: n for n, p in adapter.items()}
    with atomic_dir(ckpt) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(tmp / _ADAPTER))
        save_file({**optimizer_tensors(optimizer, names), **_rng_tensors(device)}, str(tmp / _OPTIMIZER))
        write_json(tmp / _STATE, state)


def load_checkpoint(ckpt: Path, *, fingerprint: str, total_steps: int) -> Checkpoint | None:
    """Load ``ckpt`` if it belongs to this run (same fingerprint and total steps); otherwise None.

    A checkpoint of another run, or an unreadable one, is deleted: it can never be resumed.
    """
    if not ckpt.is_dir():
        return None
    try:
        state = json.loads((ckpt / _STATE).read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint or state.get("total_steps") != total_steps:
            logger.info("ignoring stale checkpoint %s (fingerprint or steps differ)", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
            return None
        return Checkpoint(state, load_file(str(ckpt / _ADAPTER)), load_file(str(ckpt / _OPTIMIZER)))
    except (OSError, ValueError, SafetensorError) as exc:  # ValueError covers json.JSONDecodeError
        logger.warning("ignoring unreadable checkpoint %s: %s", ckpt, exc)
        shutil.rmtree(ckpt, ignore_errors=True)
        return None


def resume(
    ckpt: Path,
    *,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    fingerprint: str,
    total_steps: int,
) -> dict[str, Any] | None:
    """Restore ``params``, the optimizer state and the RNG from a matching checkpoint.

    Returns:
        The checkpoint's state.json (``step``, ``losses``, ``tokens``, ``seconds``), or None to start fresh.
    """
    loaded = load_checkpoint(ckpt, fingerprint=fingerprint, total_steps=total_steps)
    if loaded is None:
        return None
    if set(loaded.adapter) != set(params):
        logger.warning("ignoring checkpoint %s: its tensors do not match the adapter", ckpt)
        shutil.rmtree(ckpt, ignore_errors=True)
        return None
    with torch.no_grad():
        for name, tensor in loaded.adapter.items():
            params[name].copy_(tensor)
    load_optimizer_tensors(optimizer, {p: n for n, p in params.items()}, loaded.optimizer)
    restore_rng(loaded.optimizer, device)
    return loaded.state
