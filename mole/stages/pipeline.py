"""One function per pipeline stage: config in, workspace files out, a small JSON-able summary returned (their
contract: :mod:`mole.stages.registry`).

Stages read and write only the workspace paths of docs/architecture.md, each output written atomically, so the CLI,
DVC (``dvc repro``) and the Prefect flow can all call them and a failed stage leaves earlier outputs intact.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mole.base import load_configured_base
from mole.cluster.clustering import MAP_KEY, fit_clusters, row_text
from mole.cluster.embed import make_embedder
from mole.config import BuildConfig
from mole.data.prepare import prepare_dataset
from mole.eval.evaluate import add_variant, eval_inputs, evaluate_variant, run_evaluate, variant_kwargs, write_card
from mole.eval.metrics import ModelScorer, mole_generator
from mole.io import atomic_dir, read_jsonl, write_json, write_jsonl
from mole.merge import run_merge_prune
from mole.nn.model import MoLEModel
from mole.routing.diagnostics import routing_agreement, row_routing, row_routings, utilization_record
from mole.routing.extend import extend_gates
from mole.routing.first_token import fit_first_gate
from mole.routing.gallery import never_route, warm_start_rows
from mole.routing.train import joint_train
from mole.routing.warm_start import warm_start_gates
from mole.stages.incremental import plan_clusters, write_incremental_clusters
from mole.training.experts import SHARED_APPLIED, built_adapters, current_index, expert_lineage, run_train_experts
from mole.training.gallery import gallery_experts, gallery_lineage
from mole.training.lifecycle import incremental_lineage, incremental_plan, kept_slots, previous_gates, proportional
from mole.workspace import (
    check_writable,
    cluster_paths,
    eval_paths,
    load_prepared,
    mole_paths,
    prepared_paths,
    record_stage_time,
    recover_workspace,
)

logger = logging.getLogger(__name__)


def _timed(stage: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Record the wall time of each successful run of the decorated stage function (see ``stage_times``)."""

    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @functools.wraps(fn)
        def run(cfg: BuildConfig, *args: Any, **kwargs: Any) -> dict[str, Any]:
            t0 = time.perf_counter()
            out = fn(cfg, *args, **kwargs)
            record_stage_time(cfg, stage, time.perf_counter() - t0)
            return out

        return run

    return wrap


def begin(cfg: BuildConfig) -> None:
    """What every stage does first: check the workspace is writable, then repair interrupted writes."""
    check_writable(cfg)
    recover_workspace(cfg)


@_timed("prepare")
def prepare(cfg: BuildConfig) -> dict[str, Any]:
    """Validate, clean and split the data into data/prepared/{train,eval}.jsonl and stats.json."""
    begin(cfg)

    train, evals, stats = prepare_dataset(cfg)
    paths = prepared_paths(cfg)
    # The three files are written into a fresh directory that replaces the old one only when all succeed.
    with atomic_dir(paths["train"].parent) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", evals)
        write_json(tmp / "stats.json", stats)
    return {**stats, "paths": {k: str(v) for k, v in paths.items()}}


@_timed("cluster")
def cluster(cfg: BuildConfig) -> dict[str, Any]:
    """Embed and cluster the training rows; write assignments, centroids, the clusterer and report.json."""
    begin(cfg)

    train, evals = load_prepared(cfg)
    c = cfg.cluster
    if len(train) < c.min_rows():
        raise ValueError(
            f"{prepared_paths(cfg)['train']}: {len(train)} rows is too few for the requested clusters "
            f"(needs at least {c.min_rows()}); lower cluster.min_cluster_size or add data"
        )
    plan, extension = plan_clusters(cfg, train)
    if extension is not None:  # an incremental build: the previous build's clusters, extended
        return write_incremental_clusters(cfg, plan, extension, train, evals, _assignments)
    bm = cfg.base_model
    embedder = make_embedder(
        c.embedder,
        dim=c.tfidf_dim,
        seed=cfg.seed,
        batch_size=c.batch_size,
        base_spec=bm.name,
        revision=bm.revision,
        trust_remote_code=bm.trust_remote_code,
        dtype=bm.dtype,
        device=bm.device,
    )
    clusterer, labels, report = fit_clusters(
        train,
        embedder,
        k=c.k,
        k_min=c.k_min,
        k_max=c.k_max,
        min_cluster_size=c.min_cluster_size,
        balanced=c.balanced,
        n_init=c.n_init,
        seed=cfg.seed,
        sample=c.silhouette_sample,
        k_rule=c.k_rule,
        k_tolerance=c.k_tolerance,
        k_gain_fraction=c.k_gain_fraction,
        refine_rows=c.refine,
        lm_smoothing=c.lm_smoothing,
        radius_quantile=cfg.build.distance_quantile,
    )
    eval_labels = clusterer.assign([row_text(r) for r in evals])
    report["eval_sizes"] = [int((eval_labels == i).sum()) for i in range(clusterer.k)]
    paths = cluster_paths(cfg)
    projection = report.pop(MAP_KEY)
    with atomic_dir(paths["dir"]) as tmp:
        clusterer.save(tmp)
        np.savez(tmp / paths["map"].name, **projection)
        write_jsonl(tmp / "assignments.jsonl", _assignments(train, labels))
        write_jsonl(tmp / "eval_assignments.jsonl", _assignments(evals, eval_labels))
        write_json(tmp / "report.json", report)
        write_json(tmp / paths["plan"].name, plan)
    logger.info("k=%d sizes=%s silhouette=%s ari=%s", report["k"], report["sizes"], report["silhouette"], report["ari"])
    return {**report, "paths": {k: str(v) for k, v in paths.items()}}


def _assignments(rows: list[dict[str, Any]], labels: Any) -> list[dict[str, Any]]:
    out = []
    for row, label in zip(rows, labels, strict=True):
        item = {"id": row["id"], "cluster": int(label)}
        if "domain" in row:
            item["domain"] = row["domain"]
        out.append(item)
    return out


@_timed("train-experts")
def train_experts(cfg: BuildConfig, progress: Any = None) -> dict[str, Any]:
    """Train one LoRA expert per cluster (and the multitask baseline) into artifacts/experts/."""
    begin(cfg)

    return run_train_experts(cfg, progress=progress)


def base_ref(cfg: BuildConfig) -> dict[str, Any]:
    """The base-model reference stored with a MoLE model (enough to load it again)."""
    return {**cfg.base_model.model_dump(mode="json"), "seed": cfg.seed}


def first_gate(cfg: BuildConfig, experts: int, index: dict[str, Any]) -> bool:
    """Whether the model gets a first-token gate: asked for, token routing, two experts or more, no sink tokens."""
    r = cfg.router
    return r.first_gate and r.routing == "token_topk" and experts > 1 and not index.get("sink_tokens")


@_timed("train-router")
def train_router(cfg: BuildConfig, progress: Any = None) -> dict[str, Any]:
    """Build the MoLE model from the experts, warm-start and jointly train the routers, save artifacts/mole/."""
    begin(cfg)

    train, evals = load_prepared(cfg)
    full_index = current_index(cfg)  # the experts of the current clusters and settings, intact
    index = full_index["experts"]
    shared = full_index.get("shared")
    cpaths = cluster_paths(cfg)
    clusters = {a["id"]: a["cluster"] for a in read_jsonl(cpaths["assignments"])}
    eval_clusters = {a["id"]: a["cluster"] for a in read_jsonl(cpaths["eval_assignments"])}
    expert_of = {e["cluster"]: i for i, e in enumerate(index)}
    gallery = gallery_experts(cfg)  # imported experts: after the trained ones in the bank, never trained here
    base, tok = load_configured_base(cfg)
    model = MoLEModel.from_experts(
        base=base,
        tokenizer=tok,
        expert_dirs=[*(cfg.path(e["path"]) for e in index), *(g["path"] for g in gallery)],
        expert_ids=[*(e["id"] for e in index), *(g["name"] for g in gallery)],
        base_ref=base_ref(cfg),
        top_k=cfg.router.top_k,
        routing=cfg.router.routing,
        path=cfg.router.path,
        clusters=[*(e["cluster"] for e in index), *([] for _ in gallery)],
        shared_dir=cfg.path(shared["path"]) if shared and full_index.get("shared_mode") in SHARED_APPLIED else None,
        pool=cfg.router.pool,
        sink_tokens=int(full_index.get("sink_tokens", 0)),
        first_gate=first_gate(cfg, len(index) + len(gallery), full_index),
    )
    lineage = expert_lineage(cfg, full_index)  # the experts' parents: the adapters of experts.json
    plan = incremental_plan(cfg)
    if plan is not None:  # their parents: the previous build's experts
        lineage = incremental_lineage(lineage, full_index, plan)
    lineage |= gallery_lineage(cfg, gallery)
    model.lineage = {eid: lineage[eid] for eid in [*model.spec.expert_ids, model.spec.shared] if eid in lineage}
    kept = kept_slots(cfg, full_index, model.spec.expert_ids, model.shared_index) if plan else {}
    kept |= {len(index) + j: g["path"] for j, g in enumerate(gallery)}  # the joint phase keeps them as imported
    r, max_len = cfg.router, cfg.experts.max_length
    stats = prepared_paths(cfg)["stats"]
    if stats.exists():
        model.spec.prompt_suffix = json.loads(stats.read_text(encoding="utf-8")).get("prompt_suffix")
    if r.top_k > model.spec.top_k:  # k was chosen below router.top_k: every expert is a token's top-k
        logger.warning("router.top_k=%d but only %d experts (k chosen by the clusters): routing uses top_k=%d",
                       r.top_k, model.spec.num_experts, model.spec.top_k)  # fmt: skip
    train_experts_idx = [expert_of[clusters[row["id"]]] for row in train]
    eval_experts_idx = [expert_of[eval_clusters[row["id"]]] for row in evals]
    metrics: dict[str, Any] = {"built_from": built_adapters(full_index), "warm_start": None,
                               "top_k": {"configured": r.top_k, "used": model.spec.top_k}}  # fmt: skip
    gates = previous_gates(cfg, model.spec, plan) if plan else None
    extending = gates is not None and next(iter(gates.values())).shape[0] < model.spec.num_experts
    n_ws = r.warm_start_rows
    ws_rows, ws_experts = train[:n_ws], train_experts_idx[:n_ws]
    if gallery and (extending or (gates is None and r.warm_start)):  # gate rows are fitted: gallery rows join
        ws_rows, ws_experts, metrics["gallery"] = warm_start_rows(
            model, gallery, ws_rows, ws_experts, batch_size=r.batch_size, max_length=max_len
        )
    if model.first_gate is not None:  # fitted afresh every build (a logistic fit over the rows' first tokens), before
        # the warm start, whose held-out scoring routes by it
        fit_rows, fit_experts = [*ws_rows, *train[n_ws:]], [*ws_experts, *train_experts_idx[n_ws:]]
        metrics["first_gate"] = fit_first_gate(model, fit_rows, fit_experts, c=r.warm_start_c, max_length=max_len,
                                               seed=cfg.seed)  # fmt: skip
    if model.spec.num_experts == 1:  # k = 1: no mixture, every token goes to the one expert whatever the gate says
        logger.info("one expert (k = 1): no routing to warm-start or learn")
    elif gates is not None:  # incremental: the previous gates (and rows fitted for new experts), a brief re-fit
        extended: dict[str, Any] = {}
        if extending:  # experts were added: fit their rows
            extended = extend_gates(model, gates, [*ws_rows, *train[n_ws:]], [*ws_experts, *train_experts_idx[n_ws:]],
                                    c=r.warm_start_c, batch_size=r.batch_size,
                                    max_length=max_len, max_tokens=r.warm_start_tokens, max_rows=r.warm_start_rows,
                                    seed=cfg.seed)  # fmt: skip
        else:
            model.routers.load_state_dict(gates)
        r = r.model_copy(
            update={"steps": proportional(r.steps, plan["new_rows"] + plan["removed_rows"], plan["old_rows"])}
        )
        metrics["warm_start"] = {"method": "previous", "from": plan["from"], "refit_steps": r.steps, **extended}
    elif r.warm_start:
        metrics["warm_start"] = warm_start_gates(
            model, ws_rows, ws_experts, method=r.warm_start_method,
            c=r.warm_start_c, batch_size=r.batch_size, max_length=max_len, max_tokens=r.warm_start_tokens,
            seed=cfg.seed, progress=progress,
        )  # fmt: skip
    unserved = [g["slot"] for g in metrics.get("gallery", {}).values() if g["source"] == "none"]
    if unserved:
        never_route(model, unserved)
    held_out = (metrics["warm_start"] or {}).get("heldout_agreement")
    if held_out is not None and not unserved:  # measured by the warm start on its held-out rows: no second pass
        metrics["agreement_before_training"], metrics["agreement_before_training_rows"] = (
            held_out,
            "warm-start held-out",
        )
    else:
        metrics["agreement_before_training"] = routing_agreement(
            row_routing(model, evals, batch_size=r.batch_size, max_length=max_len)[1], eval_experts_idx
        )
    if r.routing == "token_topk" and r.steps > 0:
        metrics["joint"] = joint_train(model, train, r, max_length=max_len, seed=cfg.seed, progress=progress,
                                       frozen=tuple(kept))  # fmt: skip
    for i, directory in kept.items():  # reused experts leave as they came, byte for byte
        model.load_expert(i, directory)
    (weights, logits), (every, _) = row_routings(model, evals, batch_size=r.batch_size, max_length=max_len,
                                                 prompt_only=(True, False))  # fmt: skip
    metrics["agreement"] = routing_agreement(logits, eval_experts_idx)
    metrics["utilization"] = weights.mean(0).round(4).tolist()  # (L, E): mean routing weight per block
    metrics["utilization_all_tokens"] = utilization_record(model, evals, every)  # merge-prune's, without its pass
    paths = mole_paths(cfg)
    model.save_pretrained(
        paths["dir"], extra_files={"clusterer": cpaths["dir"]}, extra_json={"train_metrics.json": metrics}
    )
    logger.info(
        "router agreement with clusters: %.3f before joint training, %.3f after",
        metrics["agreement_before_training"],
        metrics["agreement"],
    )
    summary = {k: v for k, v in metrics.items() if k not in ("joint", "built_from")}
    if "joint" in metrics:
        j = metrics["joint"]
        summary.update(final_loss=j["loss"][-1], seconds=j["seconds"], tokens_per_s=j["tokens_per_s"])
    return {**summary, "experts": len(index), "paths": {k: str(v) for k, v in paths.items()}}


@_timed("evaluate")
def evaluate(cfg: BuildConfig, progress: Any = None) -> dict[str, Any]:
    """Evaluate every variant on the eval split: reports/eval.json, eval.md and the PNGs."""
    begin(cfg)

    report = run_evaluate(cfg, progress=progress)
    return {**report, "paths": {k: str(eval_paths(cfg)[k]) for k in ("eval", "markdown")}}


@_timed("merge-prune")
def merge_prune(cfg: BuildConfig) -> dict[str, Any]:
    """Prune unused and merge similar experts; keep the result only if eval loss stays within the tolerance.

    When the change is accepted, the merged model is evaluated and added to reports/eval.json as ``mole_merged``.
    """
    begin(cfg)

    summary = run_merge_prune(cfg)
    report = eval_paths(cfg)["eval"]
    if summary.get("accepted") and report.exists():
        rows, clusters, _, _ = eval_inputs(cfg)
        bm = cfg.base_model
        model = MoLEModel.from_pretrained(
            mole_paths(cfg)["dir"], device=bm.device, trust_remote_code=bm.trust_remote_code
        )
        gen = mole_generator(model, max_new_tokens=cfg.evaluate.max_new_tokens)
        metrics = evaluate_variant(
            "mole_merged", ModelScorer(model, model.tokenizer), rows, clusters, **variant_kwargs(cfg), generate=gen
        )
        training = _merged_training(report, model)
        write_card(cfg, add_variant(report, "mole_merged", metrics, training=training))  # the card of the merged model
        summary["mole_merged"] = {k: metrics[k] for k in ("loss", "ppl", "exact_match")}
    return summary


def _merged_training(report: Path, model: Any) -> dict[str, Any] | None:
    """mole_merged's training compute: mole's adapters (the router re-fit trains no adapter), its own rank per token."""
    import json

    mole = json.loads(report.read_text(encoding="utf-8")).get("training", {}).get("mole")
    if mole is None:
        return None
    spec = model.spec
    return {**mole, "rank": spec.r * (spec.top_k + (spec.shared is not None))}
