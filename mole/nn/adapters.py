"""Reading and writing single experts as standard peft LoRA adapter directories.

A peft adapter dir holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module name>.lora_A.weight`` (r, d_in) and ``....lora_B.weight`` (d_out, r). Expert i of
a MoLE bank is exactly such an adapter, so experts round-trip bit-exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

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
