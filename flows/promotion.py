"""The promotion gate: does a new build take alias ``champion`` from the current one? Pure logic, no MLflow.

Both builds are compared on ``tracking.metric`` of the variant describing their model, on the same eval rows:
when the champion's recorded eval-set hash (tag ``mole.eval_set_hash``) equals this build's, its recorded value
is used; otherwise the champion is re-scored on this build's eval rows (``rescore``) before comparing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mole.config import BuildConfig


@dataclass(frozen=True)
class Decision:
    """The gate's verdict and the numbers behind it (all written to the version's tags)."""

    promote: bool
    reason: str
    metric: str
    value: float
    margin: float
    champion_version: str | None = None
    champion_value: float | None = None
    champion_source: str | None = None  # "tag": same eval set; "rescored": re-scored on this build's eval rows
    improvement: float | None = None
    beats_baseline: bool | None = None  # the build's verdict against its own multitask LoRA (None: no baseline)

    @property
    def alias(self) -> str:
        return "champion" if self.promote else "challenger"

    def tags(self) -> dict[str, str]:
        """``mole.promotion.*`` tags: decision, reason and numbers."""
        values = {
            "decision": self.alias, "reason": self.reason, "metric": self.metric, "value": repr(self.value),
            "margin": repr(self.margin), "champion_version": self.champion_version,
            "champion_value": None if self.champion_value is None else repr(self.champion_value),
            "champion_source": self.champion_source,
            "improvement": None if self.improvement is None else repr(self.improvement),
            "beats_baseline": None if self.beats_baseline is None else str(self.beats_baseline).lower(),
        }  # fmt: skip
        return {f"mole.promotion.{k}": v for k, v in values.items() if v is not None}


def baseline_refusal(cfg: BuildConfig, report: dict[str, Any]) -> str | None:
    """Why the build may not be champion because it loses to its own multitask baseline; None when it may."""
    from mole.eval.verdict import verdict

    if not cfg.tracking.require_beats_baseline:
        return None
    v = verdict(report)
    if v["beats_baseline"] is not False:
        return None
    em = ""
    if v["exact_match"] is not None and v["baseline_exact_match"] is not None:
        em = f", exact match {v['exact_match']:.3f} vs {v['baseline_exact_match']:.3f}"
    return (
        f"{v['variant']} does not beat its own baseline {v['baseline']} (loss {v['loss']:.4f} vs "
        f"{v['baseline_loss']:.4f}, {v['relative_loss']:+.2%}{em}) and tracking.require_beats_baseline is on: "
        "stays challenger"
    )


def relative_improvement(new: float, old: float, *, greater_is_better: bool) -> float:
    """How much better ``new`` is than ``old``, as a fraction of ``|old|`` (negative when worse)."""
    gain = new - old if greater_is_better else old - new
    return gain / max(abs(old), 1e-12)


def decide(cfg: BuildConfig, champion: Any, build: dict[str, Any], *, rescore: Callable[[Any], float]) -> Decision:
    """Whether the build becomes champion.

    Args:
        cfg: gives ``tracking.metric``, ``greater_is_better`` and ``promotion_margin``.
        champion: the registered version holding alias ``champion`` (with ``.version`` and ``.tags``), or None.
        build: ``value`` (this build's metric) and ``eval_set_hash``.
        rescore: champion -> its metric on this build's eval rows; called only when the eval sets differ.

    Returns:
        The Decision: promote when there is no champion, or when the relative improvement over the champion exceeds
        the margin; but never a build that does not beat its own multitask LoRA baseline (when
        ``tracking.require_beats_baseline``), full or incremental alike, though its comparison with the champion is
        still made and recorded.
    """
    from mole.eval.verdict import verdict

    t, value = cfg.tracking, float(build["value"])
    beats = verdict(build["report"])["beats_baseline"] if build.get("report") else None
    common = {"metric": t.metric, "value": value, "margin": t.promotion_margin, "beats_baseline": beats}
    refusal = baseline_refusal(cfg, build.get("report") or {})
    if champion is None:
        if refusal is not None:
            return Decision(False, refusal, **common)
        return Decision(True, "first version with a metric: no champion yet", **common)
    tags = champion.tags
    same_set = tags.get("mole.eval_set_hash") == build["eval_set_hash"] and tags.get("mole.metric") == t.metric
    if same_set and "mole.metric_value" in tags:
        old, source = float(tags["mole.metric_value"]), "tag"
    else:
        old, source = float(rescore(champion)), "rescored"
    gain = relative_improvement(value, old, greater_is_better=t.greater_is_better)
    promote = gain > t.promotion_margin and refusal is None
    how = "same eval set" if source == "tag" else "champion re-scored on this build's eval rows"
    versus = (f"{t.metric} {value:.6g} vs champion v{champion.version} {old:.6g} ({how}): relative improvement "
              f"{gain:+.3%} {'>' if gain > t.promotion_margin else '<='} margin {t.promotion_margin:.3%}")  # fmt: skip
    if refusal is not None:  # the champion is still compared with (its numbers go to the tags), but cannot win
        reason = f"{refusal}; {versus}"
    else:
        reason = f"{versus}; {'promoted to champion' if promote else 'stays challenger'}"
    return Decision(promote, reason, **common, champion_version=str(champion.version), champion_value=old,
                    champion_source=source, improvement=gain)  # fmt: skip
