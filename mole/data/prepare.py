"""Validate, clean and split the domain data into the prepared train/eval sets.

Rows come out in one of two shapes, decided by the first row of the source:
``{"id", "text"}`` for language modelling, or ``{"id", "prompt", "completion"}`` (loss on the completion only).
An optional ``domain`` is carried along for evaluation and is never used for training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mole.config import BuildConfig
from mole.data.demo import generate_demo_corpus
from mole.data.readers import DataError, Record, read_source

logger = logging.getLogger(__name__)

DOMAIN = "domain"
MODES: dict[str, tuple[str, ...]] = {"text": ("text",), "prompt_completion": ("prompt", "completion")}


@dataclass
class CleanStats:
    """Counts of what cleaning kept and dropped, for the prepare report."""

    read: int = 0
    kept: int = 0
    dropped_empty: int = 0  # a field holding only whitespace
    dropped_missing: int = 0  # a field with no value: null, NaN, or a CSV row short of cells
    dropped_duplicate: int = 0
    dropped_overlap_with_eval: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> the first few rows' origins
    extra: dict[str, Any] = field(default_factory=dict)

    def drop(self, reason: str, origin: str) -> None:
        """Count a dropped row under ``reason`` (a field name of this class) and keep its origin as an example."""
        setattr(self, f"dropped_{reason}", getattr(self, f"dropped_{reason}") + 1)
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(origin)

    def describe(self) -> str:
        """One line: what was read and dropped, with example rows, e.g. for an error that no row is left."""
        parts = [f"{self.read} read"]
        for reason in ("empty", "missing", "duplicate"):
            n = getattr(self, f"dropped_{reason}")
            if n:
                parts.append(f"{n} dropped as {reason} (e.g. {', '.join(self.examples.get(reason, []))})")
        return ", ".join(parts)


EXAMPLES = 5  # origins of dropped rows kept per reason


def detect_mode(origin: str, row: dict[str, Any]) -> str:
    """Decide the row shape from the first record, or fail naming the columns found."""
    if "text" in row:
        return "text"
    if "prompt" in row or "completion" in row:
        missing = [f for f in ("prompt", "completion") if f not in row]
        if missing:
            raise DataError(f"{origin}: missing field {missing[0]!r} (columns found: {_cols(row)})")
        return "prompt_completion"
    raise DataError(f"{origin}: missing field 'text' (or 'prompt' + 'completion'); columns found: {_cols(row)}")


def _cols(row: dict[str, Any]) -> str:
    return ", ".join(map(str, row)) or "none"


def _field(origin: str, row: dict[str, Any], name: str) -> str | None:
    if name not in row:
        raise DataError(f"{origin}: missing field {name!r} (columns found: {_cols(row)})")
    value = row[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):  # parquet/pandas write NaN for missing
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{origin}: field {name!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return str(value)


def row_id(row: dict[str, Any]) -> str:
    """Stable content id of a row (its fields except the id), so ids survive re-ordering."""
    key = "\x1f".join(f"{k}={row[k]}" for k in sorted(row) if k not in ("id", DOMAIN))
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


def clean_records(
    records: Iterable[Record], *, mode: str | None = None, source: str = "the data source"
) -> tuple[list[dict[str, Any]], CleanStats, str]:
    """Normalise records to mole rows, dropping rows with an empty or missing value and exact duplicates.

    Each drop is counted, and logged with the row's origin (file and line).

    Returns:
        (rows, stats, mode). ``mode`` is taken from the first record unless given.

    Raises:
        DataError: a missing field or a wrong type, naming the record's file and line; a ``source`` with no rows,
            or none left after cleaning (with what was dropped, and where).
    """
    rows: list[dict[str, Any]] = []
    stats = CleanStats()
    seen: set[str] = set()
    for origin, raw in records:
        stats.read += 1
        mode = mode or detect_mode(origin, raw)
        values = {name: _field(origin, raw, name) for name in MODES[mode]}
        if any(v is None for v in values.values()):
            stats.drop("missing", origin)
            logger.warning("%s: dropped: no value for %s", origin, [k for k, v in values.items() if v is None])
            continue
        if any(not v.strip() for v in values.values()):
            stats.drop("empty", origin)
            continue
        row: dict[str, Any] = dict(values)
        if raw.get(DOMAIN) not in (None, ""):
            row[DOMAIN] = str(raw[DOMAIN])
        row["id"] = row_id(row)
        if row["id"] in seen:
            stats.drop("duplicate", origin)
            continue
        seen.add(row["id"])
        rows.append(row)
    if stats.read == 0:
        raise DataError(f"{source}: holds no rows")
    if not rows:
        raise DataError(f"{source}: no usable row is left after cleaning: {stats.describe()}")
    if stats.dropped_empty:
        logger.warning("%s: dropped %d rows with an empty field, e.g. %s", source, stats.dropped_empty,
                       ", ".join(stats.examples["empty"]))  # fmt: skip
    stats.kept = len(rows)
    return rows, stats, mode or "text"


def prompt_suffix(rows: list[dict[str, Any]]) -> str | None:
    """The text every training prompt ends with (e.g. ``"\nAnswer:"``), or None.

    It is the prompt template a model trained on these rows expects: ``mole predict`` appends it to a prompt that
    lacks it. Taken from the last line break (or whitespace) of the common suffix, so it is never part of a word.
    """
    prompts = [r["prompt"] for r in rows if "prompt" in r]
    if len(prompts) < 2:
        return None
    common = prompts[0]
    for p in prompts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[-1 - n] == p[-1 - n]:
            n += 1
        common = common[len(common) - n :]
        if not common:
            return None
    cut = common.rfind("\n")
    if cut < 0:
        cut = next((i for i, ch in enumerate(common) if ch.isspace()), -1)
    suffix = common[cut:] if cut >= 0 else None
    return suffix if suffix and len(suffix.strip()) >= 2 else None


def split_rows(
    rows: list[dict[str, Any]], *, eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded train/eval split, stratified by ``domain`` when rows have one, at least one eval row."""
    rng = random.Random(seed)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row.get(DOMAIN, "")].append(row)
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for key in sorted(groups):
        group = groups[key][:]
        rng.shuffle(group)
        n_eval = round(len(group) * eval_fraction) if len(group) > 1 else 0
        evals.extend(group[:n_eval])
        train.extend(group[n_eval:])
    if not evals and len(train) > 1:
        evals.append(train.pop())
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def _load(cfg: BuildConfig, source: str) -> Iterable[Record]:
    if source == "demo":
        rows = generate_demo_corpus(rows_per_skill=cfg.data.demo_rows_per_skill, seed=cfg.seed)
        return ((f"demo[row {i}]", r) for i, r in enumerate(rows))
    return read_source(source, hf_split=cfg.data.hf_split)


def prepare_dataset(cfg: BuildConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Read, validate, clean and split the configured data.

    Returns:
        (train_rows, eval_rows, stats) where stats is JSON-able.

    Raises:
        DataError: bad input, or too few rows for the requested clusters.
    """
    rows, stats, mode = clean_records(_load(cfg, cfg.data.source), source=cfg.data.source)
    if cfg.data.max_rows is not None and len(rows) > cfg.data.max_rows:
        rows = random.Random(cfg.seed).sample(rows, cfg.data.max_rows)
    eval_stats = None
    if cfg.data.eval_source:
        evals, eval_stats, _ = clean_records(_load(cfg, cfg.data.eval_source), mode=mode, source=cfg.data.eval_source)
        eval_ids = {r["id"] for r in evals}
        train = [r for r in rows if r["id"] not in eval_ids]
        stats.dropped_overlap_with_eval = len(rows) - len(train)
        random.Random(cfg.seed).shuffle(train)
    else:
        train, evals = split_rows(rows, eval_fraction=cfg.data.eval_fraction, seed=cfg.seed)
    need = cfg.cluster.min_rows()
    if len(train) < need:
        k_desc = f"cluster.k={cfg.cluster.k}" if cfg.cluster.k else f"cluster.k_min={cfg.cluster.k_min}"
        raise DataError(
            f"{cfg.data.source}: too few rows for the requested clusters: {len(train)} training rows after cleaning "
            f"({stats.describe()}), but {k_desc} × cluster.min_cluster_size={cfg.cluster.min_cluster_size} needs at "
            f"least {need}"
        )
    if not evals:
        raise DataError("the evaluation split is empty; add rows or set data.eval_source")
    report = {
        "source": cfg.data.source,
        "eval_source": cfg.data.eval_source,
        "mode": mode,
        "train_rows": len(train),
        "eval_rows": len(evals),
        "read": stats.read,
        "dropped_empty": stats.dropped_empty,
        "dropped_missing": stats.dropped_missing,
        "dropped_duplicate": stats.dropped_duplicate,
        "dropped_examples": stats.examples,
        "dropped_overlap_with_eval": stats.dropped_overlap_with_eval,
        "eval_read": eval_stats.read if eval_stats else None,
        "domains": dict(sorted(Counter(r.get(DOMAIN) for r in train if DOMAIN in r).items())) or None,
        "prompt_suffix": prompt_suffix(train),
    }
    logger.info("prepared %d train / %d eval rows (%s)", len(train), len(evals), mode)
    return train, evals, report
