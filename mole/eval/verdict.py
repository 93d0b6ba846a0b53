"""The build's verdict: does the mixture beat one LoRA trained on all the data with the same training compute?

Pure functions over an eval.json report. The model is ``mole_merged`` after an accepted merge, else ``mole``; the
baseline is the strongest ``multitask_lora*`` variant (lowest loss). The mixture *beats* it when its loss is lower
and, where rows have completions, its exact match is at least the baseline's. eval.md opens with this, and the
promotion gate (``tracking.require_beats_baseline``) refuses ``champion`` to a build that does not beat it.
"""

from __future__ import annotations

from typing import Any

BASELINE_PREFIX = "multitask_lora"


def model_variant(report: dict[str, Any]) -> str:
    """The variant describing the built model: ``mole_merged`` after an accepted merge, else ``mole``."""
    return "mole_merged" if "mole_merged" in report.get("variants", {}) else "mole"


def strongest_baseline(report: dict[str, Any]) -> str | None:
    """The ``multitask_lora*`` variant of lowest loss, or None when the build has none."""
    names = [n for n in report.get("variants", {}) if n.startswith(BASELINE_PREFIX)]
    return min(names, key=lambda n: report["variants"][n]["loss"]) if names else None


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Whether the built model beats its baseline, by how much, and at what cost.

    Returns:
        {"beats_baseline": bool | None (None: no baseline was trained), "variant", "baseline", "loss",
        "baseline_loss", "relative_loss" ((loss - baseline) / baseline), "exact_match", "baseline_exact_match",
        "latency_ratio_vs_base", "adapter_mb", "headline" (one sentence)}.
    """
    variants = report.get("variants", {})
    name, base_name = model_variant(report), strongest_baseline(report)
    model = variants.get(name)
    cost = report.get("cost") or {}
    out: dict[str, Any] = {"variant": name, "baseline": base_name, "beats_baseline": None}
    out |= {"latency_ratio_vs_base": cost.get("latency_ratio_vs_base"), "adapter_mb": cost.get("adapter_mb")}
    if model is None or base_name is None:
        out["headline"] = f"No multitask LoRA baseline was trained, so this build cannot say whether {name} beats it."
        return out
    base = variants[base_name]
    rel = (model["loss"] - base["loss"]) / base["loss"]
    em, base_em = model.get("exact_match"), base.get("exact_match")
    em_ok = em is None or base_em is None or em >= base_em
    beats = model["loss"] < base["loss"] and em_ok
    out |= {"beats_baseline": beats, "loss": model["loss"], "baseline_loss": base["loss"], "relative_loss": rel}
    out |= {"exact_match": em, "baseline_exact_match": base_em}
    out["headline"] = _headline(out, name, base_name, report.get("training"))
    return out


def _headline(v: dict[str, Any], name: str, base_name: str, training: dict[str, Any] | None) -> str:
    said = "beats" if v["beats_baseline"] else "does NOT beat"
    loss = f"loss {v['loss']:.4f} vs {v['baseline_loss']:.4f} ({v['relative_loss']:+.1%})"
    em = ""
    if v["exact_match"] is not None and v["baseline_exact_match"] is not None:
        em = f", exact match {v['exact_match']:.3f} vs {v['baseline_exact_match']:.3f}"
    matched = ""
    if training and base_name in training and name in training:
        m, b = training[name], training[base_name]
        matched = (f" (training tokens {m['tokens']:,} vs {b['tokens']:,}; adapter rank per token {m['rank']} "
                   f"vs {b['rank']})")  # fmt: skip
    cost = ""
    if v["latency_ratio_vs_base"] is not None:
        cost = f", at ×{v['latency_ratio_vs_base']:.2f} the base's forward time"
        if v["adapter_mb"] is not None:
            cost += f" and {v['adapter_mb']:.1f} MB of adapters"
    return f"The mixture ({name}) {said} one LoRA trained on all the data ({base_name}){matched}: {loss}{em}{cost}."
