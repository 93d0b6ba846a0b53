"""What a build cost: the wall time of each stage and of the training in them, and each variant's training compute
(optimizer steps, tokens, adapter rank applied per token) — eval.json's ``cost.build_time`` and ``training``."""

from __future__ import annotations

import json
from typing import Any

from mole.config import BuildConfig
from mole.training.experts import SHARED_APPLIED, rank_per_token
from mole.workspace import experts_paths, mole_paths, stage_times


def build_time(cfg: BuildConfig, evaluate_seconds: float) -> dict[str, Any]:
    """Wall seconds of each stage's latest run (this evaluation's so far) and of the training steps in them.

    ``training_fraction``: the share of the stages' total spent in optimizer steps of MoLE's adapters (shared,
    experts, joint phase), as the adapters' own train_metrics record them (a cotrained run once, not once per expert);
    ``training_fraction_with_baseline`` adds the multitask baseline's training.
    """

    stages = stage_times(cfg) | {"evaluate": round(evaluate_seconds, 3)}
    index_path, metrics_path = experts_paths(cfg)["index"], mole_paths(cfg)["metrics"]
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else {}
    joint = (json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}).get("joint") or {}
    # A reused adapter trained in an earlier run: its seconds are not part of this build's stage times.
    fresh = [e for e in [index.get("shared"), *index.get("experts", []), index.get("baseline")] if e]
    fresh = [e for e in fresh if not e.get("reused")]
    # cotrained: one run trained the shared adapter and every expert, and each entry records that run's seconds
    cotrained = index.get("shared_mode") == "cotrained"
    training = {
        "shared": sum(e.get("seconds", 0.0) for e in fresh if e.get("kind") == "shared"),
        "experts": 0.0 if cotrained else sum(e.get("seconds", 0.0) for e in fresh if e.get("kind") == "expert"),
        "joint": float(joint.get("seconds", 0.0)),
        "multitask_lora": sum(e.get("seconds", 0.0) for e in fresh if e.get("kind") == "multitask_lora"),
    }
    total = round(sum(stages.values()), 3)  # the fraction uses the total eval.json shows
    mole_training = training["shared"] + training["experts"] + training["joint"]
    with_baseline = mole_training + training["multitask_lora"]  # the compute-matched baseline trains as long again
    return {"stages": stages, "training": training, "total": total,
            "training_fraction": mole_training / total if total > 0 else None,
            "training_fraction_with_baseline": with_baseline / total if total > 0 else None}  # fmt: skip


def training_compute(cfg: BuildConfig, variants: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Optimizer steps, training tokens and adapter rank applied per token of every variant (eval.json "training").

    MoLE's count is every phase that trained its adapters: the shared LoRA, the experts and the joint phase (when it
    trains the experts; a router-only phase adds its steps and tokens all the same). The fixed-routing variants use
    the same adapters, so they share those counts, but apply one expert per token.
    """

    index_path = experts_paths(cfg)["index"]
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else {}
    r, shared = cfg.experts.lora.r, index.get("shared")
    residual = index.get("shared_mode") in SHARED_APPLIED

    def trained(entry: dict[str, Any] | None) -> tuple[int, int]:
        if not entry:
            return 0, 0
        m = cfg.path(entry["path"]) / "train_metrics.json"
        tokens = json.loads(m.read_text(encoding="utf-8")).get("tokens", 0) if m.exists() else entry.get("tokens", 0)
        return int(entry["steps"]), int(tokens)

    each = [trained(e) for e in index.get("experts", [])]
    if index.get("shared_mode") == "cotrained":  # one run trained them all: the shared entry holds its counts
        parts = {"cotrained": trained(shared)}
    else:
        parts = {"shared": trained(shared), "experts": (sum(s for s, _ in each), sum(t for _, t in each))}
    metrics = mole_paths(cfg)["metrics"]
    joint = (json.loads(metrics.read_text(encoding="utf-8")).get("joint") or {}) if metrics.exists() else {}
    parts["joint"] = (int(joint.get("steps", 0)), int(joint.get("tokens", 0)))
    steps, tokens = sum(p[0] for p in parts.values()), sum(p[1] for p in parts.values())
    k = len(index.get("experts", [])) or 1
    mole = {"steps": steps, "tokens": tokens, "phases": {n: {"steps": s, "tokens": t} for n, (s, t) in parts.items()}}
    out = {"base": {"steps": 0, "tokens": 0, "rank": 0}}
    out["mole"] = {**mole, "rank": rank_per_token(cfg, k)}  # the same rule the baseline's rank is matched to
    for name in ("oracle_experts", "cluster_routing"):
        out[name] = {**mole, "rank": r * (1 + residual)}
    if index.get("baseline"):
        b_steps, b_tokens = trained(index["baseline"])
        out["multitask_lora"] = {"steps": b_steps, "tokens": b_tokens, "rank": int(index["baseline"].get("r", r))}
    return {n: v for n, v in out.items() if n in variants or n == "mole"}
