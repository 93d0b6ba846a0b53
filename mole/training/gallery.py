"""The workspace's gallery of imported experts: ``mole add-expert PATH --name NAME`` copies an external peft LoRA
adapter dir into ``artifacts/gallery/<name>/`` once it is checked against the workspace's base model and bank.

An adapter joins only if it was made for the same base (name and revision, when it names them) and fits its shapes,
targets the bank's modules (all of them, plain LoRA) and holds floating-point weights; its rank may differ (the
bank pads it to its own rank, exactly: ``mole.nn.adapters.fit_rank``). A refused adapter is named with every
mismatch, and nothing in the gallery changes: the copy is written beside its target and renamed into place.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from mole.base import load_configured_base
from mole.config import BuildConfig
from mole.io import atomic_dir, read_json, recover
from mole.nn.adapters import CONFIG, WEIGHTS, adapter_problems, read_adapter, stable_config
from mole.nn.lineage import write_lineage
from mole.workspace import GALLERY, check_writable

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = re.compile(r"^(expert_\d+|shared|multitask_lora)$")  # the names of the experts a build trains


def gallery_dir(cfg: BuildConfig) -> Path:
    """The workspace's gallery: one peft adapter dir per imported expert."""
    return cfg.path(GALLERY)


def add_expert(cfg: BuildConfig, source: str | Path, name: str, *, base: Any = None) -> dict[str, Any]:
    """Check the peft adapter dir ``source`` against the workspace's base and bank, then copy it to the gallery as
    ``name`` (with a lineage.json naming its source and content hash).

    Args:
        cfg: the build config (``base_model``, ``experts.lora.target_modules``, ``workspace``).
        source: a peft LoRA adapter dir (adapter_config.json + adapter_model.safetensors).
        name: the expert's name in the gallery.
        base: the loaded base model (default: loaded from ``cfg.base_model``).

    Returns:
        {"name", "path", "sha256", "r", "lora_alpha", "modules"}.

    Raises:
        ValueError: a bad name, or an adapter that does not fit (every mismatch named).
        FileExistsError: the gallery already has ``name``.
        FileNotFoundError: ``source`` is not a peft adapter dir (safetensors required).
    """
    source, dest = Path(source), gallery_dir(cfg) / name
    if not NAME.match(name) or RESERVED.match(name):
        raise ValueError(
            f"--name {name!r}: expected 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
            "other than the names of trained experts (expert_NN, shared, multitask_lora)"
        )
    check_writable(cfg)
    for line in recover([gallery_dir(cfg)]):  # what a killed add-expert left
        logger.warning("%s", line)
    if dest.exists():
        raise FileExistsError(f"{dest}: the gallery already has an expert named {name!r}")
    config, tensors = read_adapter(source)
    bm = cfg.base_model
    model = base if base is not None else load_configured_base(cfg)[0]
    problems = adapter_problems(config, tensors, base=model, base_name=bm.name, revision=bm.revision,
                                target_modules=cfg.experts.lora.target_modules)  # fmt: skip
    if problems:
        raise ValueError(f"{source}: cannot join the gallery of base model {bm.name!r}: " + "; ".join(problems))
    with atomic_dir(dest) as tmp:
        for f in (WEIGHTS, CONFIG):
            shutil.copy2(source / f, tmp / f)
        stable_config(tmp)
        record = {"id": name, "kind": "gallery", "rows": None, "steps": None, "parents": [],
                  "made_by": {"stage": "add-expert", "source": str(source.resolve())}}  # fmt: skip
        sha = read_json(write_lineage(tmp, record))["sha256"]
    modules = sum(1 for k in tensors if k.endswith("lora_A.weight"))
    logger.info("%s: added %s to the gallery (r=%s, %d modules)", dest, source, config["r"], modules)
    return {"name": name, "path": str(dest), "sha256": sha, "r": int(config["r"]),
            "lora_alpha": float(config["lora_alpha"]), "modules": modules}  # fmt: skip
