"""Cache keys of the build flow's tasks, from the content of each task's inputs.

A key covers the workspace, the config sections a stage reads, the code version and the content hashes that
upstream tasks return, so re-running a crashed build skips every stage and expert that already finished with
the same inputs, and changes anywhere upstream re-run everything downstream.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mole.config import BuildConfig
from mole.stages.registry import STAGES
from mole.training.lora import BASELINE_ID
from mole.workspace import GALLERY

CHUNK = 1 << 20
EXPERT_READS = ("seed", "base_model", "experts")  # what one expert's adapter depends on (the baseline reads more)
UNKEYED = ("config", "live_run")  # config enters by the sections a stage reads; the live MLflow run not at all


def content_hash(paths: Iterable[str | Path], *, root: str | Path | None = None) -> str:
    """SHA-256 over the names and bytes of files and directory trees (missing paths count as absent)."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            name = str(f.relative_to(root)) if root else str(f)
            h.update(name.encode() + b"\0")
            if not f.exists():
                h.update(b"<absent>")
                continue
            with f.open("rb") as fh:
                while block := fh.read(CHUNK):
                    h.update(block)
    return h.hexdigest()[:32]


@functools.cache
def code_version() -> str:
    """Hash of the mole package's sources: a code change invalidates every cached stage."""
    import mole

    src = Path(mole.__file__).parent
    return content_hash([*src.rglob("*.py"), *src.rglob("*.yaml")], root=src)


def source_hash(cfg: BuildConfig) -> str:
    """Content of ``data.source``/``data.eval_source`` when local; otherwise the names (dataset ids, 'demo')."""
    parts = []
    for source in (cfg.data.source, cfg.data.eval_source):
        path = cfg.path(source) if source else None
        parts.append(content_hash([path]) if path is not None and path.exists() else str(source))
    return "+".join(parts)


def gallery_hash(cfg: BuildConfig) -> str | None:
    """Content of the gallery experts ``experts.gallery`` names (train-router reads them); None without any."""
    names = cfg.experts.gallery
    return content_hash([cfg.path(GALLERY) / n for n in names], root=cfg.path(GALLERY)) if names else None


def _fingerprint(value: Any) -> Any:
    """What of an upstream result enters the key: its content hash when it has one."""
    if isinstance(value, dict):
        return value.get("hash", value)
    if isinstance(value, list):
        return [_fingerprint(v) for v in value]
    return value


def stage_key(stage: str, *, reads: tuple[str, ...] | None = None) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect ``cache_key_fn`` for the task of registered stage ``stage`` (first parameter ``config``).

    The key covers the config keys the stage reads (``STAGES[stage].reads``, or ``reads``), the code, the
    upstream results' content hashes, for ``prepare`` the raw data source and for ``train-router`` the gallery
    experts it adds to the bank.
    """
    keys = STAGES[stage].reads if reads is None else reads

    def key(context: Any, parameters: dict[str, Any]) -> str:
        cfg: BuildConfig = parameters["config"]
        payload = {
            "task": context.task.name,
            "workspace": str(Path(cfg.workspace).resolve()),
            "config": cfg.section_hash(*keys),
            "code": code_version(),
            "upstream": {k: _fingerprint(v) for k, v in sorted(parameters.items()) if k not in UNKEYED},
            "data": source_hash(cfg) if stage == "prepare" else gallery_hash(cfg) if stage == "train-router" else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    return key


def adapter_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key of one ``train-expert`` task: the multitask baseline reads all that train-experts reads (its steps
    and rank follow the router section, see ``mole.training.experts.multitask_steps``); an expert reads only the
    seed, the base model and the ``experts`` section."""
    reads = None if parameters.get("name") == BASELINE_ID else EXPERT_READS
    return stage_key("train-experts", reads=reads)(context, parameters)


def outputs_exist(paths: Iterable[str | Path]) -> bool:
    """Whether every output of a stage is on disk; when not, the flow refreshes that stage's cache entry."""
    return all(Path(p).exists() for p in paths)
