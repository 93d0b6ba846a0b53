"""Evaluation of every variant on the same eval rows in one run: reports/eval.json, eval.md and plots.

Variants (docs/architecture.md, "Evaluation"): ``base``; ``multitask_lora`` (the peft baseline); ``mole`` (token
routers);
``oracle_experts`` (each row forced to the expert of its true group: information unavailable at inference);
``cluster_routing`` (each row routed whole by its prompt's nearest centroid). A later stage adds ``mole_merged``
with :func:`add_variant`. Models are loaded one at a time; the base stays loaded for the latency comparison.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mole.base import load_configured_base
from mole.cluster.clustering import row_text
from mole.config import BuildConfig
from mole.data.tokenize import eval_batches
from mole.eval.card import model_card
from mole.eval.compute import build_time, training_compute
from mole.eval.figures import write_plots
from mole.eval.metrics import (
    Generate,
    ModelScorer,
    Route,
    RoutedScorer,
    Rows,
    Scorer,
    fixed_route,
    hf_generator,
    loss_summary,
    mole_cost,
    mole_generator,
    render_markdown,
    routing_stats,
    same_routes,
    true_groups,
)
from mole.eval.plots import per_cluster_loss, variant_bars
from mole.eval.tables import write_tables
from mole.eval.verdict import verdict
from mole.io import atomic_path, read_jsonl, write_json, write_jsonl
from mole.nn.model import MoLEModel
from mole.routing.explain import explain
from mole.routing.first_token import first_gate_agreement
from mole.training.experts import check_model_current
from mole.workspace import cluster_paths, eval_paths, experts_paths, load_prepared, mole_paths

__all__ = ["ModelScorer", "Scorer", "add_variant", "evaluate_variant", "normalize_answer", "reporting", "run_evaluate"]
logger = logging.getLogger(__name__)


ROWS_KEY = "per_row"  # a variant's per-row losses and completions, written to eval_rows.jsonl, not eval.json

# ``progress(name, step, total, loss)`` of the evaluation running in this context (run_evaluate's), told after each
# scoring and generation batch of every variant as ``eval <variant>``: every variant reports without each helper
# passing it on.
_PROGRESS: contextvars.ContextVar[Callable[[str, int, int, float], None] | None] = contextvars.ContextVar(
    "eval_progress", default=None
)


def normalize_answer(text: str) -> str:
    """Canonical answer for exact match: first line, stripped, whitespace collapsed, no trailing period, casefolded."""
    lines = text.splitlines()
    first = " ".join(lines[0].split()) if lines else ""  # split() also strips
    return first.removesuffix(".").rstrip().casefold()


def evaluate_variant(
    name: str,
    scorer: Scorer,
    rows: Rows,
    clusters: list[int],
    *,
    batch_size: int,
    max_length: int,
    generate: Generate | None = None,
    generate_rows: int | None = None,
    generate_batch_size: int | None = None,
) -> dict[str, Any]:
    """Loss, perplexity and exact match of one variant, overall and per eval cluster.

    Args:
        name: the variant's name (for logging).
        scorer: scores batches of ``rows`` encoded with its tokenizer.
        rows: eval rows (``text``, or ``prompt`` + ``completion``).
        clusters: each row's eval cluster, same length as ``rows``.
        batch_size: rows per scoring and generation batch.
        max_length: token limit of an encoded row (as in training).
        generate: rows -> greedy completions; None skips exact match.
        generate_rows: exact match on the first this many rows (all when None).
        generate_batch_size: prompts decoded together (``batch_size`` when None).

    Returns:
        {"loss", "ppl", "exact_match", "tokens", "per_cluster": {str(c): {"loss", "ppl", "exact_match", "rows"}}};
        loss is the token-weighted mean NLL of the labelled tokens; exact_match is None without completions.
    """
    if len(rows) != len(clusters) or not rows:
        raise ValueError(f"{name}: expected one cluster per row and at least one row, got {len(clusters)}/{len(rows)}")
    t0 = time.perf_counter()
    nll, tokens = torch.zeros(len(rows), dtype=torch.float64), torch.zeros(len(rows), dtype=torch.long)
    gen_rows = rows[:generate_rows] if generate_rows else rows
    total = len(rows) + (sum("completion" in r for r in gen_rows) if generate is not None else 0)
    report, done = _PROGRESS.get(), 0
    for idx, batch in eval_batches(rows, scorer.tokenizer, batch_size=batch_size, max_length=max_length):
        s, n = scorer(batch, [rows[i] for i in idx])
        nll[idx], tokens[idx] = s.double().cpu(), n.long().cpu()
        if report is not None:
            done += len(idx)
            report(f"eval {name}", done, total, float(nll.sum() / tokens.sum()) if tokens.sum() else math.nan)
    if not tokens.sum():
        raise ValueError(f"{name}: the {len(rows)} rows have no labelled tokens to score")
    loss = float(nll.sum() / tokens.sum())
    tell = None if report is None else (lambda k: report(f"eval {name}", len(rows) + k, total, loss))
    hits, texts = _exact_matches(gen_rows, generate, generate_batch_size or batch_size, tell)
    out = {**_summary(nll, tokens, hits, range(len(rows))), "tokens": int(tokens.sum())}
    # per row (popped into eval_rows.jsonl by run_evaluate): mean NLL of its labelled tokens, greedy completion
    out[ROWS_KEY] = [{"loss": float(nll[i] / tokens[i]) if tokens[i] else None, "completion": texts.get(i)}
                     for i in range(len(rows))]  # fmt: skip
    del out["rows"]  # only per cluster
    out["per_cluster"] = {
        str(c): _summary(nll, tokens, hits, [i for i, ci in enumerate(clusters) if ci == c])
        for c in sorted(set(clusters))
    }
    logger.info(
        "%s: loss %.4f ppl %.2f exact match %s (%d rows, %.1fs)",
        name, out["loss"], out["ppl"], out["exact_match"], len(rows), time.perf_counter() - t0,
    )  # fmt: skip
    return out


def _exact_matches(
    rows: Rows, generate: Generate | None, batch_size: int, tell: Callable[[int], None] | None = None
) -> tuple[dict[int, bool], dict[int, str]]:
    """Row index -> whether the greedy completion matches, and the completion, for the rows with a completion;
    ``tell(n)`` after each batch, ``n`` rows generated so far."""
    todo = [i for i, r in enumerate(rows) if "completion" in r] if generate is not None else []
    hits: dict[int, bool] = {}
    texts: dict[int, str] = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        for i, text in zip(chunk, generate([rows[i] for i in chunk]), strict=True):
            hits[i], texts[i] = normalize_answer(text) == normalize_answer(rows[i]["completion"]), text
        if tell is not None:
            tell(len(hits))
    return hits, texts


def _summary(nll: torch.Tensor, tokens: torch.Tensor, hits: dict[int, bool], idx: Any) -> dict[str, Any]:
    idx = list(idx)
    scored = [hits[i] for i in idx if i in hits]
    out = loss_summary(float(nll[idx].sum()), int(tokens[idx].sum()))
    return {**out, "exact_match": sum(scored) / len(scored) if scored else None, "rows": len(idx)}


# --------------------------------------------------------------------------------------------- the stage
def eval_inputs(cfg: BuildConfig) -> tuple[Rows, list[int], list[int], dict[str, Any]]:
    """Eval rows, their eval clusters, their true groups (for the oracle) and the cluster report."""

    _, rows = load_prepared(cfg)
    cp = cluster_paths(cfg)
    for p in (cp["assignments"], cp["eval_assignments"], cp["report"]):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; run `mole cluster` first")
    of = {a["id"]: int(a["cluster"]) for a in read_jsonl(cp["eval_assignments"])}
    missing = [r["id"] for r in rows if r["id"] not in of]
    if missing:
        raise ValueError(f"{cp['eval_assignments']}: no cluster for eval rows {missing[:3]}; re-run `mole cluster`")
    clusters = [of[r["id"]] for r in rows]
    groups = true_groups(rows, clusters, read_jsonl(cp["assignments"]))
    return rows, clusters, groups, json.loads(cp["report"].read_text(encoding="utf-8"))


def variant_kwargs(cfg: BuildConfig) -> dict[str, Any]:
    ev = cfg.evaluate
    return {"batch_size": ev.batch_size, "max_length": cfg.experts.max_length, "generate_rows": ev.generate_rows,
            "generate_batch_size": ev.generate_batch_size}  # fmt: skip


def _evaluate_lm(name: str, model: nn.Module, tok: Any, cfg: BuildConfig, rows: Rows, clusters: list[int]) -> dict:
    gen = hf_generator(model, tok, max_new_tokens=cfg.evaluate.max_new_tokens)
    return evaluate_variant(name, ModelScorer(model, tok), rows, clusters, **variant_kwargs(cfg), generate=gen)


def _multitask_lora(cfg: BuildConfig, base: nn.Module, tok: Any, rows: Rows, clusters: list[int]) -> dict | None:
    """The multitask LoRA baseline on ``base``, whose LoRA layers are removed again afterwards (no second copy of the
    base is loaded); None (with a warning) when it was not trained."""
    from peft import PeftModel

    adapter = experts_paths(cfg)["baseline"]
    if not (adapter / "adapter_config.json").exists():
        logger.warning("multitask_lora: %s holds no adapter; skipping the baseline variant", adapter)
        return None
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    try:
        return _evaluate_lm("multitask_lora", model, tok, cfg, rows, clusters)
    finally:
        model.unload()  # the base's own modules back in place, unmerged


def run_evaluate(
    cfg: BuildConfig,
    *,
    extra_variants: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Evaluate every variant on the eval split; write eval.json, eval.md and the plots into ``evaluate.out_dir``.

    Args:
        cfg: the build configuration.
        extra_variants: name -> metrics (as from :func:`evaluate_variant`) of further variants to report.
        progress: called as ``progress("eval <variant>", rows done, rows to do, loss so far)`` after every
            scoring and generation batch.

    Returns:
        The eval.json content: {"variants", "routing", "clustering", "cost"}.

    Raises:
        FileNotFoundError: an output of an earlier stage is missing (the message names the stage to run).
    """

    with reporting(progress):
        return _run_evaluate(cfg, extra_variants)


@contextlib.contextmanager
def reporting(progress: Callable[[str, int, int, float], None] | None) -> Iterator[None]:
    """Every :func:`evaluate_variant` in the block tells ``progress("eval <variant>", done, total, loss so far)``
    after each batch: rows scored, then rows generated (``total`` counts both)."""
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _run_evaluate(cfg: BuildConfig, extra_variants: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    mole_dir = mole_paths(cfg)["dir"]
    check_model_current(cfg)  # made from the current experts, themselves from the current clusters
    rows, clusters, groups, creport = eval_inputs(cfg)
    base, tok = load_configured_base(cfg)
    variants = {"base": _evaluate_lm("base", base, tok, cfg, rows, clusters)}
    if (lora := _multitask_lora(cfg, base, tok, rows, clusters)) is not None:
        variants["multitask_lora"] = lora
    mole = _evaluate_mole(cfg, mole_dir, base, rows, clusters, groups)
    del base
    _collect()
    variants.update(mole["variants"], **(extra_variants or {}))
    order = ["base", "multitask_lora", "oracle_experts", "cluster_routing", "mole"]
    report = {
        "variants": {n: variants[n] for n in order if n in variants} | variants,
        "routing": mole["routing"],
        "clustering": {k: creport.get(k) for k in ("k", "silhouette", "ari", "k_rule")},
        "cost": mole["cost"] | {"build_time": build_time(cfg, time.perf_counter() - t0)},
        "training": training_compute(cfg, variants),
    }
    out_dir = cfg.path(cfg.evaluate.out_dir)
    per_row = {name: v.pop(ROWS_KEY) for name, v in variants.items() if ROWS_KEY in v}
    write_jsonl(eval_paths(cfg)["rows"], [{"id": r.get("id"), **{n: per_row[n][i] for n in per_row}}
                                          for i, r in enumerate(rows)])  # fmt: skip
    write_report(eval_paths(cfg)["eval"], report)
    write_card(cfg, report)
    write_plots(cfg, out_dir, report, mole["expert_ids"], mole["examples"])
    logger.info("wrote %s, eval.md and plots", eval_paths(cfg)["eval"])
    return report


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate_mole(
    cfg: BuildConfig, mole_dir: Path, base: nn.Module, rows: Rows, clusters: list[int], groups: list[int]
) -> dict[str, Any]:
    """The MoLE variants, routing statistics and cost (latency against ``base``), from one load of the model."""

    model = MoLEModel.from_pretrained(
        mole_dir, device=cfg.base_model.device, trust_remote_code=cfg.base_model.trust_remote_code
    )
    expert_of = model.spec.expert_of_cluster()
    unserved = sorted({c for c in clusters + groups if c not in expert_of})
    if unserved:
        raise ValueError(f"{mole_dir}: no expert serves clusters {unserved}; the model does not match the clusters")
    fixed = {"oracle_experts": [expert_of[g] for g in groups]}  # each row's expert, where routing is fixed per row
    if model.clusterer is not None:  # embed all prompts once rather than batch by batch
        fixed["cluster_routing"] = model.route_by_cluster([row_text(r) for r in rows]).tolist()
    else:
        logger.warning("cluster_routing: %s has no clusterer/; skipping the variant", mole_dir)
    routes: dict[str, Route | None] = {name: fixed_route(rows, experts) for name, experts in fixed.items()}
    routes["mole"] = None
    repeats = same_routes(fixed)
    ev = cfg.evaluate
    variants, routed = {}, RoutedScorer(model, model.tokenizer)  # the mole variant's scoring pass gives its routing
    for name, route in routes.items():
        same = repeats.get(name)
        if same is not None:  # the same expert for every row: the same scores and answers, not computed twice
            logger.info("%s routes every row as %s does: its scores are %s's", name, same, same)
            variants[name] = copy.deepcopy(variants[same])
            continue
        gen = mole_generator(model, max_new_tokens=ev.max_new_tokens, route=route)
        scorer = ModelScorer(model, model.tokenizer, route) if route is not None else routed
        variants[name] = evaluate_variant(name, scorer, rows, clusters, **variant_kwargs(cfg), generate=gen)
    weights, logits = routed.routing()  # as row_routing over the same batches
    routing = routing_stats(weights, logits, [expert_of[c] for c in clusters])
    routing["top_k"] = {"configured": cfg.router.top_k, "used": model.spec.top_k}  # used < configured: k was small
    if model.first_gate is not None:  # how often it sends a row's first token to the row's cluster's expert
        routing["first_gate_agreement"] = first_gate_agreement(model, rows, [expert_of[c] for c in clusters],
                                                               max_length=cfg.experts.max_length)  # fmt: skip
    _, batch = next(eval_batches(rows, model.tokenizer, batch_size=ev.batch_size, max_length=cfg.experts.max_length))
    cost = mole_cost(model, base, batch, mole_dir, reps=ev.latency_reps)
    logger.info("top-1 agreement %.3f; forward x%.3f of base", routing["top1_agreement"], cost["latency_ratio_vs_base"])
    examples = _routing_examples(model, rows, groups, max_new_tokens=ev.max_new_tokens)
    return {"variants": variants, "routing": routing, "cost": cost, "expert_ids": list(model.spec.expert_ids),
            "examples": examples}  # fmt: skip


EXAMPLES = 3  # eval rows whose per-token routing reports/token_routing.png shows
EXAMPLE_WORDS = 16  # a text row (no prompt) is shown from its first words on


def _routing_examples(model: MoLEModel, rows: Rows, groups: list[int], *, max_new_tokens: int) -> list[Any]:
    """The per-token routing (prompt and greedy completion) of a few eval rows, each of another true group where
    there are enough: a row's prompt as trained, or a text row's first words."""
    picked: dict[int, dict[str, Any]] = {}
    for row, group in zip(rows, groups, strict=True):
        picked.setdefault(group, row)
    chosen = list(picked.values())[:EXAMPLES] or rows[:EXAMPLES]
    prompts = [r["prompt"] if "prompt" in r else " ".join(row_text(r).split()[:EXAMPLE_WORDS]) for r in chosen]
    return explain(model, prompts, max_new_tokens=max_new_tokens, raw=True)


# --------------------------------------------------------------------------------------------- reports


def write_card(cfg: BuildConfig, report: dict[str, Any]) -> Path:
    """Write the model card (:mod:`mole.eval.card`) of this evaluation as ``evaluate.out_dir``/model_card.md."""

    path = eval_paths(cfg)["card"]
    with atomic_path(path) as tmp:
        tmp.write_text(model_card(cfg, report), encoding="utf-8")
    return path


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write ``report`` (its verdict recomputed) as eval.json at ``path`` and eval.md beside it, each atomically."""

    report["verdict"] = verdict(report)
    path = Path(path)
    write_json(path, report)
    write_tables(report, path.parent)
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(render_markdown(report), encoding="utf-8")
    return path


def add_variant(
    path: str | Path, name: str, metrics: dict[str, Any], *, training: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Add (or replace) one variant in an existing eval.json; rewrite it, eval.md, per_cluster_loss.png and
    variants.png.

    Args:
        path: the eval.json written by :func:`run_evaluate`.
        name: the variant's name, e.g. ``"mole_merged"``.
        metrics: its metrics, as returned by :func:`evaluate_variant`.
        training: its entry of the report's "training" (steps, tokens, rank), if any.

    Returns:
        The updated report.
    """

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `mole evaluate` first")
    report = json.loads(path.read_text(encoding="utf-8"))
    report["variants"][name] = {k: v for k, v in metrics.items() if k != ROWS_KEY}
    if training is not None:
        report.setdefault("training", {})[name] = training
    write_report(path, report)
    per_cluster_loss(report["variants"], path.parent / "per_cluster_loss.png")
    variant_bars(report["variants"], path.parent / "variants.png")
    return report
