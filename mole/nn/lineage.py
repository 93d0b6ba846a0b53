"""Lineage of a MoLE model's experts: each expert's content hash, the build that made it and the weights it came from.

Every expert dir of a MoLE model dir (``experts/<id>/``, a peft adapter dir) holds ``lineage.json`` beside the peft
files::

    {"id": "expert_00", "kind": "expert", "sha256": "<content hash>", "cluster": 0, "rows": 40, "steps": 6,
     "joint_steps": 2, "made_by": {"stage": "train-router", "config_hash": "...", "data_sha256": "..."},
     "parents": [{"id": "expert_00", "sha256": "...", "fingerprint": "...", "path": "artifacts/experts/expert_00"}]}

The content hash (:func:`adapter_digest`) covers what the adapter computes, not how its files are laid out: every
tensor's name, dtype, shape and bytes, and the config fields that scale it (r, lora_alpha, use_rslora). The same
weights saved by another peft version (which writes its version into adapter_config.json) hash the same.
:func:`model_experts` reads a model dir's records (recomputing each hash from the files) and :func:`compare` says,
per expert id, what changed between two models: ``mole diff`` and the registry's version tags are built on them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mole.config import BuildConfig
from mole.io import read_json, sha256_file
from mole.nn.adapters import CONFIG, WEIGHTS
from mole.nn.spec import read_spec
from mole.workspace import prepared_paths

LINEAGE = "lineage.json"
SCALE_FIELDS = ("r", "lora_alpha", "use_rslora")  # the adapter_config.json fields that change what it computes
STATUSES = ("changed", "added", "removed", "unchanged")
BRIEF = ("sha256", "kind", "cluster", "rows", "steps", "joint_steps", "recorded_sha256")
CHUNK = 1 << 20


def adapter_digest(directory: str | Path) -> str:
    """SHA-256 (hex) of a peft LoRA adapter dir's content: its scale fields and every tensor (name, dtype, shape,
    bytes), read from the safetensors file in name order (its header metadata and layout do not count).

    Raises:
        FileNotFoundError: the dir lacks adapter_config.json or adapter_model.safetensors.
        ValueError: the weights file is not a readable safetensors file (naming it).
    """
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a peft adapter dir (missing {name})")
    config = read_json(directory / CONFIG)
    scale = {"r": config.get("r"), "lora_alpha": float(config.get("lora_alpha") or 0),
             "use_rslora": bool(config.get("use_rslora", False))}  # fmt: skip
    digest = hashlib.sha256(json.dumps(scale, sort_keys=True).encode())
    path = directory / WEIGHTS
    with path.open("rb") as fh:
        header, start = _safetensors_header(fh, path)
        for name in sorted(k for k in header if k != "__metadata__"):
            t = header[name]
            begin, end = t["data_offsets"]
            digest.update(json.dumps([name, t["dtype"], t["shape"]]).encode())
            fh.seek(start + begin)
            for offset in range(begin, end, CHUNK):
                digest.update(fh.read(min(CHUNK, end - offset)))
    return digest.hexdigest()


def _safetensors_header(fh: Any, path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of an open safetensors file and the offset where its tensor data starts."""
    size = path.stat().st_size
    raw = fh.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n < 2 or 8 + n > size:
        raise ValueError(f"{path}: not a safetensors file (bad header length); the file is damaged or truncated")
    try:
        header = json.loads(fh.read(n))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError(f"{path}: not a safetensors file (bad header); the file is damaged or truncated") from None
    if 8 + n + max(ends, default=0) > size:
        raise ValueError(f"{path}: shorter than its header says; the file is damaged or truncated")
    return header, 8 + n


def write_lineage(directory: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``directory/lineage.json`` with the content hash of the adapter there (computed now)."""
    path = Path(directory) / LINEAGE
    record = {**record, "sha256": adapter_digest(directory)}
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_lineage(directory: str | Path) -> dict[str, Any] | None:
    """An expert dir's lineage.json, or None when it has none (a model written before mole recorded lineage)."""
    path = Path(directory) / LINEAGE
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def expert_dirs(model_dir: str | Path) -> dict[str, Path]:
    """Expert id -> its adapter dir in a MoLE model dir: the routed experts in bank order, then the shared one."""
    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    ids = [*spec.expert_ids, *([spec.shared] if spec.shared else [])]
    return {eid: model_dir / "experts" / eid for eid in ids}


def model_experts(model_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Expert id -> lineage record of every expert of a MoLE model dir, each with the content hash of its files now.

    A record whose lineage.json names another hash than its files have now gets ``"recorded_sha256"`` (the
    expert was changed after it was written, so its other fields may not describe it). Experts without lineage.json
    get only ``id``, ``kind`` and ``sha256``.

    Raises:
        FileNotFoundError: ``model_dir`` is not a MoLE model dir, or an expert dir is missing (naming it).
    """
    spec = read_spec(model_dir)
    out = {}
    for eid, d in expert_dirs(model_dir).items():
        record = read_lineage(d) or {}
        sha = adapter_digest(d)
        kind = "shared" if eid == spec.shared else "expert"
        out[eid] = {"id": eid, "kind": kind, **record, "sha256": sha}
        if record.get("sha256") not in (None, sha):
            out[eid]["recorded_sha256"] = record["sha256"]
    return out


def brief(record: dict[str, Any]) -> dict[str, Any]:
    """A lineage record in the form registry tags and ``mole diff --json`` use: content hash, kind, cluster, rows,
    steps (where known), parents as ``{"id", "sha256"}`` and the stage that made it (``made_by``)."""
    out = {k: record[k] for k in BRIEF if record.get(k) is not None}
    out["parents"] = [{"id": p.get("id"), "sha256": p.get("sha256")} for p in record.get("parents") or []]
    stage = record.get("made_by")
    if isinstance(stage, dict):
        stage = stage.get("stage")
    return out | ({"made_by": stage} if stage else {})


def made_by(cfg: BuildConfig, stage: str) -> dict[str, Any]:
    """Which build made an expert: the stage, the hash of the config (but the workspace path) and of the rows."""
    config_hash = cfg.section_hash(*(n for n in BuildConfig.model_fields if n != "workspace"))
    train = prepared_paths(cfg)["train"]
    return {"stage": stage, "config_hash": config_hash, "data_sha256": sha256_file(train) if train.is_file() else None}


def compare(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per expert id (``new``'s order, then the removed ones): ``status`` (changed / added / removed / unchanged by
    content hash) with its ``old`` and ``new`` records (None on the side that lacks it)."""
    rows = []
    for eid in [*new, *(e for e in old if e not in new)]:
        a, b = old.get(eid), new.get(eid)
        if a is None:
            status = "added"
        elif b is None:
            status = "removed"
        else:
            status = "unchanged" if a["sha256"] == b["sha256"] else "changed"
        rows.append({"id": eid, "status": status, "old": a, "new": b})
    return rows
