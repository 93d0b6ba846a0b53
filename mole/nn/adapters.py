"""Reading and writing single experts as standard peft LoRA adapter directories.

A peft adapter dir holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module name>.lora_A.weight`` (r, d_in) and ``....lora_B.weight`` (d_out, r). Expert i of
a MoLE bank is exactly such an adapter, so experts round-trip bit-exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mole.base import loadable_base
from mole.io import load_safetensors, read_json

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def adapter_keys(module_name: str) -> tuple[str, str]:
    """The safetensors keys of a module's LoRA A and B in a peft adapter file."""
    return f"{PREFIX}{module_name}.lora_A.weight", f"{PREFIX}{module_name}.lora_B.weight"


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load an adapter dir's config and tensors (safetensors only).

    Raises:
        FileNotFoundError: the dir lacks adapter_config.json or adapter_model.safetensors.
        ValueError: the adapter is not a plain LoRA adapter.
    """
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory}: not a peft adapter dir (missing {name}; safetensors required)")
    config = read_json(directory / CONFIG)
    if config.get("peft_type") not in (None, "LORA") or config.get("use_dora") or config.get("rank_pattern"):
        raise ValueError(f"{directory / CONFIG}: only plain LoRA adapters (no DoRA, no rank_pattern) can be experts")
    return config, load_safetensors(directory / WEIGHTS)


def stable_config(directory: str | Path) -> None:
    """Rewrite a peft adapter_config.json with its target modules sorted.

    peft keeps them as a set, so two runs of the same training write them in different orders: the same adapter
    would get other bytes, digests and DVC hashes.
    """
    path = Path(directory) / CONFIG
    config = read_json(path)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def write_adapter(
    directory: str | Path,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int,
    lora_alpha: float,
    target_modules: list[str],
    base_model: str | None = None,
) -> Path:
    """Write one expert as a peft adapter dir.

    Args:
        directory: destination (created).
        tensors: module name -> (A (r, d_in), B (d_out, r)).
        r, lora_alpha, target_modules: the LoRA config written to adapter_config.json.
        base_model: recorded as ``base_model_name_or_path``.
    """
    from peft import LoraConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    for name, (a, b) in tensors.items():
        key_a, key_b = adapter_keys(name)
        flat[key_a] = a.detach().contiguous().cpu()
        flat[key_b] = b.detach().contiguous().cpu()
    save_file(flat, str(directory / WEIGHTS), metadata={"format": "pt"})
    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=sorted(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    cfg.save_pretrained(str(directory))
    stable_config(directory)
    return directory


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def adapter_scale(config: dict[str, Any]) -> float:
    """The scale peft applies to an adapter's ``B A``: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA)."""
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def fit_rank(
    a: torch.Tensor, b: torch.Tensor, *, scale: float, bank_r: int, bank_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter's A (r, d_in) and B (d_out, r) at ``scale`` as a bank slot of rank ``bank_r >= r`` at
    ``bank_scale``: A padded with zero rows, B with zero columns and multiplied by ``scale / bank_scale``, so that
    ``bank_scale · B' A' = scale · B A`` (the padded directions add exactly zero)."""
    r = a.shape[0]
    if r > bank_r:
        raise ValueError(f"adapter rank {r} is above the bank's r={bank_r}")
    a_pad = torch.cat([a, a.new_zeros(bank_r - r, a.shape[1])])  # (bank_r, d_in)
    b_pad = torch.cat([b * (scale / bank_scale), b.new_zeros(b.shape[0], bank_r - r)], dim=1)  # (d_out, bank_r)
    return a_pad, b_pad


def adapter_problems(config: dict[str, Any], tensors: dict[str, torch.Tensor], *, base: torch.nn.Module,
                     base_name: str | None, revision: str | None, target_modules: list[str]) -> list[str]:  # fmt: skip
    """What keeps a peft LoRA adapter (its config and tensors) from joining a bank on ``base``, one line each naming
    the field or module: another base model or revision, other target modules, extra trainable weights, a module the
    base lacks or that does not fit its shapes, a weight that is not floating point. Another rank is fine."""
    problems = []
    name = config.get("base_model_name_or_path")
    if name and base_name and name not in (base_name, loadable_base(base_name)):
        problems.append(f"base_model_name_or_path: {name!r}, but the workspace's base model is {base_name!r}")
    if config.get("revision") and revision and config["revision"] != revision:
        problems.append(f"revision: {config['revision']!r}, but the base model's revision is {revision!r}")
    targets = config.get("target_modules")
    targets = sorted([targets] if isinstance(targets, str) else targets or [])
    if targets != sorted(target_modules):
        problems.append(f"target_modules: {targets}, but the bank's are {sorted(target_modules)}")
    for field in ("modules_to_save", "alpha_pattern", "layers_to_transform"):
        if config.get(field):
            problems.append(f"{field}: {config[field]!r}; only plain LoRA on every target module can join the bank")
    if config.get("bias", "none") != "none":
        problems.append(f"bias: {config['bias']!r}; the bank has no LoRA bias (expected 'none')")
    return problems + _weight_problems(tensors, base, sorted(target_modules))


def _weight_problems(tensors: dict[str, torch.Tensor], base: torch.nn.Module, targets: list[str]) -> list[str]:
    """Modules of the adapter the base lacks or whose shapes differ, base target modules it lacks, non-float weights."""
    problems = [f"{k}: dtype {t.dtype}; expected one of float32, float16, bfloat16"
                for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES]  # fmt: skip
    modules = dict(base.named_modules())
    wanted = [n for n, m in modules.items() if n.split(".")[-1] in targets and isinstance(m, torch.nn.Linear)]
    names = {k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    for module in sorted(names):
        key_a, key_b = adapter_keys(module)
        layer = modules.get(module)
        if not isinstance(layer, torch.nn.Linear):
            problems.append(f"module {module}: the base model has no such linear layer")
        elif key_a not in tensors or key_b not in tensors:
            problems.append(f"module {module}: the adapter lacks {key_a if key_a not in tensors else key_b}")
        else:
            a, b = tensors[key_a].shape, tensors[key_b].shape
            if a[1] != layer.in_features or b[0] != layer.out_features or a[0] != b[1]:
                problems.append(f"module {module}: lora_A {tuple(a)}, lora_B {tuple(b)} do not fit the base's "
                                f"linear ({layer.out_features} x {layer.in_features}); expected A (r, "
                                f"{layer.in_features}) and B ({layer.out_features}, r)")  # fmt: skip
    missing = [m for m in wanted if m not in names]
    if missing:
        problems.append(f"module {missing[0]}: no weights in the adapter ({len(missing)} target modules missing)")
    return problems


def module_name(root: nn.Module, target: nn.Module) -> str:
    """The dotted name of ``target`` inside ``root`` (the name its adapter keys are made from)."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module is not part of the model")
