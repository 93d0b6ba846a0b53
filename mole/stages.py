"""One function per pipeline stage: config in, workspace files out, a small JSON-able summary returned.

Stages read and write only the workspace paths of DESIGN.md, each output written atomically, so the CLI,
DVC (``dvc repro``) and the Prefect flow can all call them and a failed stage leaves earlier outputs intact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mole.config import BuildConfig
from mole.io import atomic_dir, read_jsonl, write_json, write_jsonl

logger = logging.getLogger(__name__)


def prepared_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``prepare`` writes its outputs."""
    out = cfg.path(cfg.data.out_dir)
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "stats": out / "stats.json"}


def cluster_paths(cfg: BuildConfig) -> dict[str, Path]:
    """Where ``cluster`` writes its outputs."""
    out = cfg.path(cfg.cluster.out_dir)
    return {
        "dir": out,
        "assignments": out / "assignments.jsonl",
        "eval_assignments": out / "eval_assignments.jsonl",
        "centroids": out / "centroids.npy",
        "report": out / "report.json",
    }


def prepare(cfg: BuildConfig) -> dict[str, Any]:
    """Validate, clean and split the data into data/prepared/{train,eval}.jsonl and stats.json."""
    from mole.data.prepare import prepare_dataset

    train, evals, stats = prepare_dataset(cfg)
    paths = prepared_paths(cfg)
    # The three files are written into a fresh directory that replaces the old one only when all succeed.
    with atomic_dir(paths["train"].parent) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", evals)
        write_json(tmp / "stats.json", stats)
    return {**stats, "paths": {k: str(v) for k, v in paths.items()}}


def _load_prepared(cfg: BuildConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    paths = prepared_paths(cfg)
    for key in ("train", "eval"):
        if not paths[key].exists():
            raise FileNotFoundError(f"{paths[key]} does not exist; run `mole prepare` first")
    return read_jsonl(paths["train"]), read_jsonl(paths["eval"])


def cluster(cfg: BuildConfig) -> dict[str, Any]:
    """Embed and cluster the training rows; write assignments, centroids, the clusterer and report.json."""
    from mole.cluster import fit_clusters, row_text
    from mole.embed import make_embedder

    train, evals = _load_prepared(cfg)
    c = cfg.cluster
    if len(train) < c.min_rows():
        raise ValueError(
            f"{prepared_paths(cfg)['train']}: {len(train)} rows is too few for the requested clusters "
            f"(needs at least {c.min_rows()}); lower cluster.min_cluster_size or add data"
        )
    bm = cfg.base_model
    embedder = make_embedder(
        c.embedder, dim=c.tfidf_dim, seed=cfg.seed, batch_size=c.batch_size, base_spec=bm.name,
        revision=bm.revision, trust_remote_code=bm.trust_remote_code, dtype=bm.dtype, device=bm.device,
    )
    clusterer, labels, report = fit_clusters(
        train, embedder, k=c.k, k_min=c.k_min, k_max=c.k_max, min_cluster_size=c.min_cluster_size,
        balanced=c.balanced, n_init=c.n_init, seed=cfg.seed, sample=c.silhouette_sample,
    )
    eval_labels = clusterer.assign([row_text(r) for r in evals])
    report["eval_sizes"] = [int((eval_labels == i).sum()) for i in range(clusterer.k)]
    paths = cluster_paths(cfg)
    with atomic_dir(paths["dir"]) as tmp:
        clusterer.save(tmp)
        write_jsonl(tmp / "assignments.jsonl", _assignments(train, labels))
        write_jsonl(tmp / "eval_assignments.jsonl", _assignments(evals, eval_labels))
        write_json(tmp / "report.json", report)
    logger.info("k=%d sizes=%s silhouette=%s ari=%s", report["k"], report["sizes"], report["silhouette"],
                report["ari"])
    return {**report, "paths": {k: str(v) for k, v in paths.items()}}


def _assignments(rows: list[dict[str, Any]], labels: Any) -> list[dict[str, Any]]:
    out = []
    for row, label in zip(rows, labels, strict=True):
        item = {"id": row["id"], "cluster": int(label)}
        if "domain" in row:
            item["domain"] = row["domain"]
        out.append(item)
    return out
