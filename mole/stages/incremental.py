"""Incremental builds from a previous model (``build.incremental``, ``build.previous``): the cluster stage's half.

The previous build's MoLE model dir is copied into the workspace (``artifacts/previous``), its saved clusterer
labels the new rows (:func:`mole.cluster.incremental.extend_clusters`), and ``data/clusters/incremental.json``
(the plan) says per cluster whether its expert is reused (same rows), updated (rows added or removed) or added (a
new cluster), or why this build is a full one: too many new rows, old rows the clusterer now assigns elsewhere, or a
previous model that does not fit the config. train-experts and train-router read the plan
(:mod:`mole.training.lifecycle`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mole.cluster.clustering import Clusterer, describe, project_2d, row_text
from mole.cluster.incremental import extend_clusters
from mole.config import BuildConfig
from mole.io import atomic_dir, read_json, read_jsonl, write_json, write_jsonl
from mole.nn.spec import read_spec
from mole.training.lora import SHARED_APPLIED, expert_id
from mole.workspace import PREVIOUS, SPEC_FILE, UTILIZATION_FILE, cluster_paths

logger = logging.getLogger(__name__)

SOURCE = "source.json"  # in artifacts/previous: which build it was copied from
MODEL_FILES = (SPEC_FILE, "router.safetensors", "experts", "clusterer", "train_metrics.json", UTILIZATION_FILE)


class NotIncremental(Exception):
    """This build cannot start from the previous one; the message says why."""


def model_dir_of(ref: str | Path) -> Path:
    """The MoLE model dir of ``ref``: a model dir itself, or a workspace / MLflow model dir holding artifacts/mole.

    Raises:
        FileNotFoundError: ``ref`` holds no MoLE model (naming it).
    """
    path = Path(ref)
    for candidate in (path, path / "artifacts" / "mole"):
        if (candidate / SPEC_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"build.previous={str(ref)!r}: no MoLE model there (expected {SPEC_FILE} in it or in "
                            "artifacts/mole under it)")  # fmt: skip


def stage_previous(cfg: BuildConfig, model_dir: Path, ref: str, *, baseline: Path | None = None) -> Path:
    """Copy the previous build's model (and its multitask baseline, when given) to ``artifacts/previous``."""
    dest = cfg.path(PREVIOUS)
    with atomic_dir(dest) as tmp:
        for name in MODEL_FILES:
            src = model_dir / name
            if src.exists():
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / name)
        if baseline is not None and (baseline / "adapter_model.safetensors").is_file():
            shutil.copytree(baseline, tmp / "baseline")
        write_json(tmp / SOURCE, {"ref": ref, "model_dir": str(model_dir.resolve())})
    return dest


def previous(cfg: BuildConfig) -> Path:
    """The previous build's model, staged in the workspace: a local ``build.previous`` is copied now; a
    ``models:/`` one must have been fetched by the build flow.

    Raises:
        NotIncremental: no previous build is set, or it cannot be had here.
    """
    ref, staged = cfg.build.previous, cfg.path(PREVIOUS)
    if ref is None:
        raise NotIncremental("build.previous is not set (mole build --from MODEL)")
    if ref.startswith("models:/"):
        if (staged / SOURCE).is_file() and read_json(staged / SOURCE).get("ref") == ref:
            return staged
        raise NotIncremental(f"build.previous={ref!r} is fetched by the build flow (mole build), not by this stage")
    try:
        model_dir = model_dir_of(cfg.path(ref) if not Path(ref).is_absolute() else Path(ref))
    except FileNotFoundError as exc:
        raise NotIncremental(str(exc)) from None
    workspace = model_dir.parent.parent if model_dir.name == "mole" else None
    baseline = workspace / "artifacts" / "baselines" / "multitask_lora" if workspace else None
    return stage_previous(cfg, model_dir, ref, baseline=baseline)


def _check_fits(cfg: BuildConfig, prev: Path) -> dict[str, int]:
    """The previous model's cluster -> its expert's bank slot; NotIncremental when it does not fit the config."""
    spec, lora = read_spec(prev), cfg.experts.lora
    problems = []
    if spec.base_model.get("name") != cfg.base_model.name:
        problems.append(f"base model {spec.base_model.get('name')!r} is not {cfg.base_model.name!r}")
    if spec.r != lora.r or spec.lora_alpha != lora.lora_alpha or spec.target_modules != sorted(lora.target_modules):
        problems.append(f"its experts (r={spec.r}, lora_alpha={spec.lora_alpha}, modules {spec.target_modules}) are "
                        "not those of experts.lora")  # fmt: skip
    if (spec.shared is not None) != (cfg.experts.shared in SHARED_APPLIED):
        problems.append(f"experts.shared={cfg.experts.shared!r} does not match its shared expert ({spec.shared})")
    # Its trained experts one per cluster (gallery experts, serving none, come after them and are this build's own).
    trained = [(eid, c) for eid, c in zip(spec.expert_ids, spec.clusters, strict=False) if c != []]
    clusters = [c for _, c in trained]
    if (
        len(spec.clusters) != len(spec.expert_ids)
        or not all(isinstance(c, int) and eid == expert_id(c) for eid, c in trained)
        or sorted(clusters) != list(range(len(trained)))
    ):
        problems.append(f"its experts {[eid for eid, _ in trained]} are not one per cluster (merged or pruned)")
    if not (prev / "clusterer" / "assignments.jsonl").is_file():
        problems.append("it has no saved clusterer with its rows' assignments")
    if problems:
        raise NotIncremental("the previous model does not fit this build: " + "; ".join(problems))
    return {c: i for i, c in enumerate(clusters)}


def plan_clusters(cfg: BuildConfig, train: list[dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    """Decide full or incremental; for an incremental build, label the rows with the previous clusters.

    Returns:
        (the plan, None) for a full build, or (the plan, (clusterer, labels, x)) for an incremental one.

    Raises:
        ValueError: ``build.incremental = always`` and the build cannot be incremental (naming why).
    """
    b = cfg.build
    if b.incremental == "never":
        return {"mode": "full", "reason": "build.incremental is never"}, None
    try:
        prev = previous(cfg)
        _check_fits(cfg, prev)
        plan, extension = _incremental(cfg, prev, train)
    except NotIncremental as exc:
        if b.incremental == "always":
            raise ValueError(f"build.incremental=always: {exc}") from None
        logger.warning("full build: %s", exc)
        return {"mode": "full", "reason": str(exc), "from": b.previous}, None
    return plan, extension


def _incremental(cfg: BuildConfig, prev: Path, train: list[dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    b, c = cfg.build, cfg.cluster
    old_labels = {a["id"]: int(a["cluster"]) for a in read_jsonl(prev / "clusterer" / "assignments.jsonl")}
    now = {r["id"] for r in train}
    new_rows, removed = len(now - old_labels.keys()), len(old_labels.keys() - now)
    fraction = new_rows / max(1, len(train))
    if fraction > b.max_new_fraction:
        raise NotIncremental(f"{new_rows} of {len(train)} rows are new ({fraction:.0%}), more than "
                             f"build.max_new_fraction={b.max_new_fraction}")  # fmt: skip
    bm = cfg.base_model
    clusterer = Clusterer.load(prev / "clusterer", trust_remote_code=bm.trust_remote_code)
    ext, labels, info = extend_clusters(
        clusterer, train, old_labels, min_cluster_size=c.min_cluster_size, quantile=b.distance_quantile,
        k_max=c.k_max, n_init=c.n_init, seed=cfg.seed,
    )  # fmt: skip
    if info["disagreement"] > b.max_disagreement:
        raise NotIncremental(f"the previous clusterer assigns {info['disagreement']:.0%} of the old rows to other "
                             f"clusters than their labels (build.max_disagreement={b.max_disagreement})")  # fmt: skip
    clusters = {}
    for k in range(ext.k):
        ids_now = {r["id"] for r, lab in zip(train, labels, strict=True) if lab == k}
        ids_old = {i for i, lab in old_labels.items() if lab == k}
        added, gone = len(ids_now - ids_old), len(ids_old - ids_now)
        status = "added" if k >= clusterer.k else "reused" if not added and not gone else "updated"
        clusters[str(k)] = {"status": status, "rows": len(ids_now), "old_rows": len(ids_old) if k < clusterer.k else 0,
                            "new_rows": added, "removed_rows": gone}  # fmt: skip
    plan = {"mode": "incremental", "reason": None, "from": b.previous, "previous_dir": PREVIOUS,
            "old_rows": len(old_labels), "new_rows": new_rows, "removed_rows": removed, "rows": len(train),
            "new_fraction": round(fraction, 4), "disagreement": info["disagreement"], "far_rows": info["far_rows"],
            "previous_k": clusterer.k, "k": ext.k, "clusters": clusters}  # fmt: skip
    return plan, (ext, labels, info["x"])


def write_incremental_clusters(
    cfg: BuildConfig, plan: dict[str, Any], extension: Any, train: list[dict[str, Any]], evals: list[dict[str, Any]],
    assignments: Any,
) -> dict[str, Any]:  # fmt: skip
    """Write data/clusters/ for an incremental build (as the cluster stage does, plus the plan); its report."""
    clusterer, labels, x = extension
    texts = [row_text(r) for r in train]
    report = describe(x, labels, clusterer.k, train, texts, [], seed=cfg.seed, sample=cfg.cluster.silhouette_sample)
    report.update(embedder=clusterer.embedder.name, balanced=False, k_auto=False, refined_rows=0, k_rule="incremental")
    eval_labels = clusterer.assign([row_text(r) for r in evals])
    report["eval_sizes"] = [int((eval_labels == i).sum()) for i in range(clusterer.k)]
    paths = cluster_paths(cfg)
    with atomic_dir(paths["dir"]) as tmp:
        clusterer.save(tmp)
        np.savez(tmp / paths["map"].name, **project_2d(x, clusterer.centroids, seed=cfg.seed))
        write_jsonl(tmp / "assignments.jsonl", assignments(train, labels))
        write_jsonl(tmp / "eval_assignments.jsonl", assignments(evals, eval_labels))
        write_json(tmp / "report.json", report)
        write_json(tmp / paths["plan"].name, plan)
    logger.info("incremental from %s: k %d -> %d, %d new rows, experts %s", plan["from"], plan["previous_k"],
                plan["k"], plan["new_rows"], {k: v["status"] for k, v in plan["clusters"].items()})  # fmt: skip
    return {**report, "incremental": {k: v for k, v in plan.items() if k != "clusters"},
            "paths": {k: str(v) for k, v in paths.items()}}  # fmt: skip
