"""What a build's registration records, read from its workspace: params, metrics, hashes, commits, the base.

Pure file reading (and one ``git`` call); flows/registry.py sends it all to MLflow. Nothing here imports mlflow.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from flows import cache
from mole.config import BuildConfig
from mole.nn.lineage import brief

logger = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "ppl", "exact_match")
EXPERTS_TAG = "mole.experts"  # a registered version's experts: JSON {id: {sha256, kind, cluster, rows, steps, ...}}
EXPERT_TAG = "mole.expert."  # + expert id: that expert's content hash, one tag each (searchable by equality)


def tracking_uri(cfg: BuildConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workspace>/mlflow.db`` (absolute)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.workspace).resolve() / 'mlflow.db'}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": str(value)}; lists become JSON strings (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def content_hash(path: str | Path) -> str:
    """SHA-256 (hex, 32 characters) of a file, or of a directory's relative paths and file contents."""
    return cache.content_hash([path], root=path)


def eval_set_hash(cfg: BuildConfig) -> str:
    """Hash of the eval rows (data/prepared/eval.jsonl): builds compared by the promotion gate must share it."""
    from mole.workspace import prepared_paths

    path = prepared_paths(cfg)["eval"]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `mole prepare` first")
    return content_hash(path)


def git_commit(*paths: str | Path) -> str | None:
    """HEAD of the first of ``paths`` inside a git work tree, with ``-dirty`` when it has changes; else None."""
    for path in paths:
        try:
            head = _git(path, "rev-parse", "HEAD")
        except (OSError, subprocess.CalledProcessError):
            continue
        dirty = _git(path, "status", "--porcelain", "--untracked-files=no")
        return f"{head}-dirty" if dirty else head
    return None


def _git(path: str | Path, *args: str) -> str:
    cmd = ["git", "-C", str(path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file the stages wrote; a clear error naming the stage when it is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `mole {what}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def expert_tags(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A model version's expert tags from its model dir's lineage records (``mole.nn.lineage.model_experts``).

    ``mole.experts`` holds every expert's content hash, kind, cluster, rows and steps, its parents' ids and hashes
    and the stage that made it (``mole.nn.lineage.brief``: what ``mole diff`` reads); ``mole.expert.<id>`` holds
    one expert's hash, so ``tags.`mole.expert.expert_00` = '<sha256>'`` finds every version with those weights.
    MLflow allows only letters, digits and ``_-. /:`` in a tag key: other characters of an id (``+`` of a merged
    expert) become ``-`` there; ``mole.experts`` keeps the ids as they are.
    """
    table = {eid: brief(r) for eid, r in records.items()}
    tags = {EXPERTS_TAG: json.dumps(table, separators=(",", ":"))}
    return tags | {EXPERT_TAG + re.sub(r"[^\w.\-/ :]", "-", eid): r["sha256"] for eid, r in records.items()}


LIFECYCLE_TAG = "mole.lifecycle"  # JSON {mode, reason, from, experts: {id: reused | updated | added | trained}}


def lifecycle_tags(cfg: BuildConfig) -> dict[str, str]:
    """A build's lifecycle tags from reports/lifecycle.json: full or incremental (and why, and from what), and
    what became of each expert; ``mole.lifecycle.<status>`` lists the ids of each status. None before it existed."""
    from mole.training.lifecycle import lifecycle_report

    doc = lifecycle_report(cfg)
    if doc is None:
        return {}
    statuses = {e["id"]: e["status"] for e in doc.get("experts", [])}
    table = {"mode": doc.get("mode"), "reason": doc.get("reason"), "from": doc.get("from"), "experts": statuses}
    tags = {LIFECYCLE_TAG: json.dumps(table, separators=(",", ":")), "mole.build_mode": str(doc.get("mode"))}
    for status in sorted(set(statuses.values())):
        tags[f"{LIFECYCLE_TAG}.{status}"] = ",".join(e for e, s in statuses.items() if s == status)
    return tags


def registered_variant(report: dict[str, Any]) -> str:
    """The eval.json variant describing artifacts/mole: ``mole_merged`` after an accepted merge, else ``mole``."""
    return "mole_merged" if "mole_merged" in report.get("variants", {}) else "mole"


def expert_records(cfg: BuildConfig) -> list[dict[str, Any]]:
    """One record per trained adapter (the shared one, the experts, the baseline): params, loss per step, tokens/s."""
    from mole.workspace import experts_paths

    index = read_json(experts_paths(cfg)["index"], "train-experts")
    entries = [*([index["shared"]] if index.get("shared") else []), *index.get("experts", []),
               *([index["baseline"]] if index.get("baseline") else [])]  # fmt: skip
    records = []
    for e in entries:
        metrics_file = cfg.path(e["path"]) / "train_metrics.json"
        m = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
        params = {k: e[k] for k in ("id", "cluster", "rows", "steps", "path", "reused") if k in e}
        params |= {k: m[k] for k in ("lr", "batch_size", "max_length", "r", "lora_alpha", "target_modules") if k in m}
        found = {k: m.get(k, e.get(k)) for k in ("tokens_per_s", "seconds", "final_loss")}
        scalars = {k: float(v) for k, v in found.items() if v is not None}  # none for a reused (untrained) expert
        records.append({"id": e["id"], "params": flatten(params), "loss": m.get("loss", []), "metrics": scalars})
    return records


def bundle_base(ref: dict[str, Any], dest: Path, *, max_mb: float) -> dict[str, Any]:
    """Copy (or, for ``tiny``, save) the base model into ``dest`` when its weights are under ``max_mb``.

    Args:
        ref: the ``base_model`` reference of mole_config.json (name, revision, dtype, seed, ...).
        dest: directory to create; left absent when nothing is bundled.
        max_mb: bundle only weights smaller than this many MiB (0 never bundles).

    Returns:
        {"bundled": bool, "kind", "mb", "reason"}; ``dest/base.json`` describes a bundle for flows/pyfunc.py.
    """
    from mole.base import resolve_base

    rb = resolve_base(ref["name"])
    if rb.kind == "hub":
        return {"bundled": False, "kind": rb.kind, "mb": None, "reason": "Hub model: referenced by id and revision"}
    if rb.kind == "tiny":  # rebuilt from config + seed: save what it builds to
        from mole.nn.spec import load_spec_base

        model, tokenizer = load_spec_base(ref, device="cpu")
        mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        src = None
    else:
        if rb.kind == "demo":
            from mole.base import fetch_demo_base

            fetch_demo_base(progress=False)
        src = Path(rb.path) / rb.gguf_file if rb.gguf_file else Path(rb.path)
        mb = sum(w.stat().st_size for w in ([src] if src.is_file() else src.glob("*.safetensors"))) / 2**20
    if mb >= max_mb:
        reason = f"weights {mb:.1f} MB >= tracking.bundle_base_max_mb {max_mb}; referenced only"
        return {"bundled": False, "kind": rb.kind, "mb": round(mb, 3), "reason": reason}
    dest.mkdir(parents=True, exist_ok=False)
    if src is None:
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
    elif src.is_file():
        shutil.copy2(src, dest / src.name)
    else:
        _copy_dir(src, dest)
    info = {"kind": rb.kind, "file": rb.gguf_file, "mb": round(mb, 3), "source": ref}
    (dest / "base.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return {"bundled": True, "kind": rb.kind, "mb": round(mb, 3), "reason": f"bundled ({mb:.1f} MB)"}


def _copy_dir(src: Path, dest: Path) -> None:
    for f in src.iterdir():  # weights, config and tokenizer files; never pickle weights (see mole.base)
        if f.is_file() and f.suffix not in (".bin", ".pt", ".pth", ".ckpt"):
            shutil.copy2(f, dest / f.name)
