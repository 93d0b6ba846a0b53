"""The workspace's gallery of imported experts: ``mole add-expert PATH --name NAME`` copies an external peft LoRA
adapter dir into ``artifacts/gallery/<name>/`` once it is checked against the workspace's base model and bank.

An adapter joins only if it was made for the same base (name and revision, when it names them) and fits its shapes,
targets the bank's modules (all of them, plain LoRA) and holds floating-point weights; its rank may differ (the
bank pads it to its own rank, exactly: ``mole.nn.adapters.fit_rank``). A refused adapter is named with every
mismatch, and nothing in the gallery changes: the copy is written beside its target and renamed into place.

``--rows FILE`` (any data file ``data.source`` takes) keeps the rows the expert is for beside it (``rows.jsonl``,
cleaned as the prepare stage cleans rows): a build with the expert in ``experts.gallery`` warm-starts its router row
from them (:mod:`mole.routing.gallery`).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from mole.base import load_configured_base
from mole.config import BuildConfig
from mole.data.prepare import clean_records
from mole.data.readers import read_source
from mole.io import atomic_dir, read_json, read_jsonl, recover, write_jsonl
from mole.nn.adapters import CONFIG, WEIGHTS, adapter_problems, read_adapter, stable_config
from mole.nn.lineage import adapter_digest, made_by, write_lineage
from mole.sections import GALLERY_NAME
from mole.workspace import GALLERY, check_writable

logger = logging.getLogger(__name__)

NAME = re.compile(GALLERY_NAME)
ROWS = "rows.jsonl"  # in a gallery expert's dir: the rows given to add-expert --rows
RESERVED = re.compile(r"^(expert_\d+|shared|multitask_lora)$")  # the names of the experts a build trains


def gallery_dir(cfg: BuildConfig) -> Path:
    """The workspace's gallery: one peft adapter dir per imported expert."""
    return cfg.path(GALLERY)


def gallery_experts(cfg: BuildConfig) -> list[dict[str, Any]]:
    """The gallery experts ``experts.gallery`` names, in its order: {"name", "path", "rows": its rows or None}.

    Raises:
        ValueError: a name the gallery does not have (naming the field and what the gallery has), or a name twice.
    """
    names, root = cfg.experts.gallery, gallery_dir(cfg)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"experts.gallery: {twice} named more than once")
    out = []
    for name in names:
        path = root / name
        if not (path / WEIGHTS).is_file():
            have = sorted(p.name for p in root.iterdir() if (p / WEIGHTS).is_file()) if root.is_dir() else []
            raise ValueError(f"experts.gallery: {name!r} is not in the gallery {root} (it has {have or 'nothing'}; "
                             "mole add-expert PATH --name NAME adds one)")  # fmt: skip
        out.append({"name": name, "path": path, "rows": read_jsonl(path / ROWS) if (path / ROWS).is_file() else None})
    return out


def gallery_lineage(cfg: BuildConfig, gallery: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Name -> lineage record of each gallery expert of a MoLE model built now: imported, never trained by the build
    (the joint phase keeps it as it is); its parent is the gallery's copy (content hash)."""
    build = made_by(cfg, "train-router")
    return {g["name"]: {"id": g["name"], "kind": "gallery", "cluster": None, "rows": None, "steps": 0,
                        "joint_steps": 0, "made_by": build, "lifecycle": "gallery",
                        "parents": [{"id": g["name"], "path": str(Path(GALLERY) / g["name"]),
                                     "sha256": adapter_digest(g["path"])}]}
            for g in gallery}  # fmt: skip


def add_expert(
    cfg: BuildConfig, source: str | Path, name: str, *, rows: str | Path | None = None, base: Any = None
) -> dict[str, Any]:
    """Check the peft adapter dir ``source`` against the workspace's base and bank, then copy it to the gallery as
    ``name`` (with a lineage.json naming its source and content hash).

    Args:
        cfg: the build config (``base_model``, ``experts.lora.target_modules``, ``workspace``).
        source: a peft LoRA adapter dir (adapter_config.json + adapter_model.safetensors).
        name: the expert's name in the gallery.
        rows: a data file of the rows the expert is for (its router row's warm start in builds), or None.
        base: the loaded base model (default: loaded from ``cfg.base_model``).

    Returns:
        {"name", "path", "sha256", "r", "lora_alpha", "modules", "rows"}.

    Raises:
        ValueError: a bad name, or an adapter that does not fit (every mismatch named).
        DataError: a rows file that cannot be read (naming its file and line).
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
    kept = clean_records(read_source(str(rows)), source=str(rows))[0] if rows is not None else None
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
        if kept is not None:
            write_jsonl(tmp / ROWS, kept)
        record = {"id": name, "kind": "gallery", "rows": None, "steps": None, "parents": [],
                  "made_by": {"stage": "add-expert", "source": str(source.resolve())}}  # fmt: skip
        sha = read_json(write_lineage(tmp, record))["sha256"]
    modules = sum(1 for k in tensors if k.endswith("lora_A.weight"))
    logger.info("%s: added %s to the gallery (r=%s, %d modules)", dest, source, config["r"], modules)
    return {"name": name, "path": str(dest), "sha256": sha, "r": int(config["r"]),
            "lora_alpha": float(config["lora_alpha"]), "modules": modules,
            "rows": len(kept) if kept is not None else None}  # fmt: skip
