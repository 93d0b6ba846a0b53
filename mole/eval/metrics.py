"""Helpers of the evaluate stage: scorers and generators over models, routing statistics, latency, eval.md.

Nothing here writes to the workspace, so each piece is testable alone; :mod:`mole.eval.evaluate` wires them
to the workspace.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mole.data.tokenize import completions, encode_prompts, row_losses
from mole.nn.model import MoLEModel
from mole.nn.router import RouterOutput
from mole.routing.diagnostics import batch_routing, routing_agreement, routing_arrays

VARIANT_ORDER = ("base", "multitask_lora", "oracle_experts", "cluster_routing", "mole", "mole_merged")
Rows = list[dict[str, Any]]
Generate = Callable[[Rows], list[str]]  # rows -> greedy completions of their prompts
Route = Callable[[Rows], torch.Tensor]  # rows -> (B,) expert index per row


@torch.no_grad()
def greedy_completions(model: nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int) -> list[str]:
    """Greedy completions of prompts by a plain (or peft) causal LM, decoded like ``MoLEModel.generate_text``."""
    enc = encode_prompts(tokenizer, prompts)
    dev = next(model.parameters()).device
    out = model.generate(
        input_ids=enc["input_ids"].to(dev),
        attention_mask=enc["attention_mask"].to(dev),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return completions(tokenizer, prompts, out, enc["input_ids"].shape[1])


class Scorer(Protocol):
    """Scores token batches: ``scorer(batch, rows)`` -> (summed NLL (B,), labelled tokens (B,)).

    ``batch`` holds ``rows`` encoded with ``scorer.tokenizer`` (``mole.data.tokenize.eval_batches``).
    """

    tokenizer: Any

    def __call__(self, batch: dict[str, torch.Tensor], rows: Rows) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class ModelScorer:
    """A :class:`Scorer` for a causal LM, a peft model or a MoLE model (``route`` forces a MoLE model's experts)."""

    model: nn.Module
    tokenizer: Any
    route: Route | None = None

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(self.model.parameters()).device
        ids, mask, labels = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
        if isinstance(self.model, MoLEModel):
            route = self.route(rows) if self.route is not None else None
            return self.model.score(ids, mask, labels, route=route)
        return row_losses(self.model, ids, mask, labels)  # the LM head at the labelled positions only


@dataclass
class RoutedScorer:
    """A :class:`Scorer` for a MoLE model under its own routers that keeps every batch's routing as well, so the
    scoring pass also gives ``mole.routing.diagnostics.row_routing``'s numbers for the same batches."""

    model: MoLEModel
    tokenizer: Any
    parts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(self.model.parameters()).device
        ids, mask, labels = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
        routing: list[RouterOutput] = []
        out = self.model.score(ids, mask, labels, routing=routing)
        self.parts.append(batch_routing(routing, batch))
        return out

    def routing(self) -> tuple[np.ndarray, np.ndarray]:
        """(weights, logits), each (n_rows, L, E): the mean routing of each row scored so far, in order."""
        return routing_arrays(self.parts)


def hf_generator(model: nn.Module, tokenizer: Any, *, max_new_tokens: int) -> Generate:
    """Greedy completions of rows' prompts by a plain or peft causal LM."""
    return lambda rows: greedy_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens)


def mole_generator(model: MoLEModel, *, max_new_tokens: int, route: Route | None = None) -> Generate:
    """Greedy completions by a MoLE model: its token routers, or each row forced to ``route(rows)``."""

    def generate(rows: Rows) -> list[str]:
        prompts = [r["prompt"] for r in rows]
        if route is None:  # the token routers, whatever routing the spec defaults to
            return model.generate_text(prompts, max_new_tokens=max_new_tokens, routing="token_topk")
        with model.forced_route(route(rows)):
            return model.generate_text(prompts, max_new_tokens=max_new_tokens, routing="token_topk")

    return generate


def same_routes(fixed: dict[str, list[int]]) -> dict[str, str]:
    """Variant -> the earlier variant (in ``fixed``'s order) whose fixed per-row experts are the same, for each
    variant that repeats one (cluster routing on clusters the router's groups match row for row, as on the demo)."""
    first: dict[tuple[int, ...], str] = {}
    out: dict[str, str] = {}
    for name, experts in fixed.items():
        out[name] = first.setdefault(tuple(experts), name)
    return {name: earlier for name, earlier in out.items() if earlier != name}


def fixed_route(rows: Rows, experts: list[int]) -> Route:
    """A :data:`Route` sending each of ``rows`` (by ``id``) to its given expert, for any batch of them."""
    by_id = {r["id"]: e for r, e in zip(rows, experts, strict=True)}
    return lambda some: torch.tensor([by_id[r["id"]] for r in some])


def true_groups(rows: Rows, eval_clusters: list[int], train_assignments: Rows) -> list[int]:
    """Each row's true cluster: the cluster holding most training rows of its ``domain``, else its eval cluster.

    Args:
        rows: eval rows, with or without ``domain``.
        eval_clusters: each row's assigned eval cluster.
        train_assignments: the lines of assignments.jsonl (``cluster`` and, when the data has one, ``domain``).
    """
    by_domain: dict[str, Counter] = {}
    for a in train_assignments:
        if a.get("domain") is not None:
            by_domain.setdefault(a["domain"], Counter())[int(a["cluster"])] += 1
    home = {d: counts.most_common(1)[0][0] for d, counts in by_domain.items()}
    return [home.get(r.get("domain"), c) for r, c in zip(rows, eval_clusters, strict=True)]


def loss_summary(nll: float, tokens: int) -> dict[str, float | None]:
    """Token-weighted mean NLL and its perplexity (None for both when there are no labelled tokens)."""
    if tokens <= 0:
        return {"loss": None, "ppl": None}
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}  # exp(>709) overflows a float


def entropy(p: np.ndarray | list[float]) -> float:
    """Shannon entropy in nats of a distribution (zeros contribute nothing)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def routing_stats(weights: np.ndarray, logits: np.ndarray, experts: list[int]) -> dict[str, Any]:
    """Utilization, its entropy and the router's top-1 agreement with each row's cluster expert.

    Args:
        weights: (n_rows, L, E) per-row mean routing weights (``mole.routing.diagnostics.row_routing``).
        logits: (n_rows, L, E) per-row mean gate logits.
        experts: each row's cluster expert, length n_rows.
    """

    per_layer = weights.astype(np.float64).mean(0)  # (L, E)
    per_layer = per_layer / per_layer.sum(1, keepdims=True)  # each row's top-k weights sum to 1; undo rounding
    overall = per_layer.mean(0)  # (E,)
    h, e = entropy(overall), per_layer.shape[1]
    return {
        "top1_agreement": routing_agreement(logits, experts),
        "utilization": [round(float(u), 6) for u in overall],
        "utilization_per_layer": [[round(float(u), 6) for u in layer] for layer in per_layer],
        "entropy": h,
        # One expert is trivially balanced; otherwise entropy relative to the uniform distribution's log E.
        "normalized_entropy": h / math.log(e) if e > 1 else 1.0,
    }


def interleaved_latency(fns: dict[str, Callable[[], Any]], *, reps: int) -> dict[str, float]:
    """Median wall time in ms of each function, run interleaved (one of each per rep) after one warm-up call.

    Interleaving exposes every function to the same background load, so their ratio is fair on a shared machine.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def mole_cost(
    model: MoLEModel, base: nn.Module, batch: dict[str, torch.Tensor], mole_dir: Path, *, reps: int
) -> dict[str, Any]:
    """Trainable parameters, adapter size on disk, and forward latency on one batch, MoLE vs base.

    Args:
        model: the MoLE model (its experts + routers are the trainable parameters).
        base: a plain copy of its base model, loaded separately.
        batch: one eval batch (``input_ids``, ``attention_mask``, each (B, T)).
        mole_dir: the saved MoLE model; its experts/ and router.safetensors are the adapter bytes.
        reps: timed forwards of each model.
    """
    dev = next(base.parameters()).device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    ms = interleaved_latency(
        {"base": lambda: base(input_ids=ids, attention_mask=mask), "mole": lambda: model(ids, mask)}, reps=reps
    )
    files = [*(mole_dir / "experts").rglob("*"), mole_dir / "router.safetensors"]
    return {
        "trainable_params": sum(p.numel() for p in [*model.expert_parameters(), *model.router_parameters()]),
        "adapter_mb": sum(p.stat().st_size for p in files if p.is_file()) / 2**20,
        "latency_ratio_vs_base": ms["mole"] / ms["base"],
        "base_ms": ms["base"],
        "mole_ms": ms["mole"],
    }


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """eval.md: the variant table, a per-cluster loss table, then routing, clustering and cost lines."""
    variants, training = report["variants"], report.get("training") or {}
    names = [n for n in VARIANT_ORDER if n in variants] + [n for n in variants if n not in VARIANT_ORDER]
    lines = ["# Evaluation", ""]
    if report.get("verdict"):
        lines += [f"**{report['verdict']['headline']}**", ""]
    if (report.get("clustering") or {}).get("k") == 1:
        lines += ["k = 1: the clustering found no groups worth an expert of their own, so this build is no mixture: "
                  "one expert (on top of the shared one) serves every token.", ""]  # fmt: skip
    top_k = (report.get("routing") or {}).get("top_k") or {}
    if top_k and top_k.get("configured", 0) > top_k.get("used", 0):
        lines += [f"router.top_k is {top_k['configured']}, but the build has {top_k['used']} experts: each token "
                  f"went to all {top_k['used']} (top_k {top_k['used']}).", ""]  # fmt: skip
    lines += ["| variant | loss | ppl | exact match | steps | training tokens | rank per token |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        v, t = variants[n], training.get(n) or {}
        tokens = "–" if t.get("tokens") is None else f"{t['tokens']:,}"
        lines.append(f"| {n} | {_fmt(v['loss'])} | {_fmt(v['ppl'], '.2f')} | {_fmt(v['exact_match'], '.3f')} | "
                     f"{t.get('steps', '–')} | {tokens} | {t.get('rank', '–')} |")  # fmt: skip
    clusters = sorted({c for v in variants.values() for c in v["per_cluster"]}, key=int)
    lines += ["", "Loss per cluster:", "", "| cluster | rows | " + " | ".join(names) + " |"]
    lines.append("|---|---:|" + "---:|" * len(names))
    for c in clusters:
        rows = next(v["per_cluster"][c]["rows"] for v in variants.values() if c in v["per_cluster"])
        cells = [_fmt(variants[n]["per_cluster"].get(c, {}).get("loss")) for n in names]
        lines.append(f"| {c} | {rows} | " + " | ".join(cells) + " |")
    lines += [""] + _summary_lines(report)
    lines += ["", "![variants](variants.png)", "![loss curves](loss_curves.png)",
              "![per-cluster loss](per_cluster_loss.png)", "![clusters](cluster_map.png)"]  # fmt: skip
    lines += ["![routing heatmap](routing_heatmap.png)", "![per-token routing of a few eval rows](token_routing.png)"]
    return "\n".join(lines) + "\n"


def _summary_lines(report: dict[str, Any]) -> list[str]:
    r, c, cost = report.get("routing", {}), report.get("clustering", {}), report.get("cost", {})
    util = ", ".join(f"{u:.3f}" for u in r.get("utilization", []))
    return [
        f"- routing: top-1 agreement with clusters {_fmt(r.get('top1_agreement'), '.3f')}; "
        f"utilization [{util}]; entropy {_fmt(r.get('entropy'), '.3f')} nats "
        f"(normalized {_fmt(r.get('normalized_entropy'), '.3f')})",
        f"- clustering: k={c.get('k')}, silhouette {_fmt(c.get('silhouette'))}, ARI {_fmt(c.get('ari'))}",
        f"- cost: {cost.get('trainable_params', 0):,} trainable parameters, {_fmt(cost.get('adapter_mb'), '.3f')} MB "
        f"of adapters, forward latency ×{_fmt(cost.get('latency_ratio_vs_base'), '.3f')} of the base "
        f"({_fmt(cost.get('mole_ms'), '.1f')} ms vs {_fmt(cost.get('base_ms'), '.1f')} ms)",
        *_build_time_lines(cost.get("build_time")),
    ]


def _build_time_lines(bt: dict[str, Any] | None) -> list[str]:
    if not bt or not bt.get("stages"):
        return []
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in bt["stages"].items())
    t, frac = bt.get("training", {}), bt.get("training_fraction")
    share = "" if frac is None else f"; {frac:.0%} of it in training steps of the mixture's adapters"
    if (both := bt.get("training_fraction_with_baseline")) is not None and t.get("multitask_lora"):
        share += f", {both:.0%} with the multitask baseline's"
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if v)
    return [f"- build time (latest run of each stage): {stages} (total {bt['total']:.1f} s{share}; {steps})"]
