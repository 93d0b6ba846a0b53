"""What registration decides and writes without a server: the promotion gate, the run description's links and
the pyfunc's input shapes (the server-side behaviour is in test_registry.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest

from flows.promotion import decide, relative_improvement
from mole.config import BuildConfig


@dataclass
class FakeVersion:
    version: str
    tags: dict[str, str]


def _gate_cfg(**tracking: Any) -> BuildConfig:
    return BuildConfig.model_validate({"tracking": tracking})


def test_gate_first_build_becomes_champion() -> None:
    d = decide(_gate_cfg(), None, {"value": 2.0, "eval_set_hash": "e"}, rescore=lambda v: pytest.fail("rescored"))
    assert d.promote and d.alias == "champion" and "no champion" in d.reason


@pytest.mark.parametrize(
    ("value", "margin", "greater", "promote"),
    [(1.8, 0.0, False, True), (1.8, 0.2, False, False), (2.0, 0.0, False, False), (2.2, 0.05, True, True)],
)
def test_gate_compares_with_the_recorded_champion_value(value: float, margin: float, greater: bool, promote: bool):
    champ = FakeVersion("3", {"mole.eval_set_hash": "e", "mole.metric": "loss", "mole.metric_value": "2.0"})
    cfg = _gate_cfg(promotion_margin=margin, greater_is_better=greater)
    d = decide(cfg, champ, {"value": value, "eval_set_hash": "e"}, rescore=lambda v: pytest.fail("rescored"))
    assert d.promote is promote
    assert d.champion_value == 2.0 and d.champion_source == "tag" and d.champion_version == "3"
    assert d.improvement == pytest.approx(relative_improvement(value, 2.0, greater_is_better=greater))
    assert d.tags()["mole.promotion.decision"] == ("champion" if promote else "challenger")
    assert ("promoted" if promote else "stays challenger") in d.reason


def test_gate_rescores_a_champion_measured_on_other_eval_rows() -> None:
    champ = FakeVersion("1", {"mole.eval_set_hash": "old", "mole.metric": "loss", "mole.metric_value": "9.0"})
    d = decide(_gate_cfg(), champ, {"value": 2.0, "eval_set_hash": "new"}, rescore=lambda v: 1.5)
    assert not d.promote and d.champion_value == 1.5 and d.champion_source == "rescored"
    assert "re-scored" in d.reason


def test_gate_refuses_a_build_that_loses_to_its_baseline_yet_records_the_champion_comparison() -> None:
    """Better than the champion but worse than its own baseline: challenger, with both comparisons in its tags."""
    champ = FakeVersion("2", {"mole.eval_set_hash": "e", "mole.metric": "loss", "mole.metric_value": "2.0"})
    report = {"variants": {"mole": {"loss": 1.5, "exact_match": None},
                           "multitask_lora": {"loss": 1.4, "exact_match": None}}}  # fmt: skip
    build = {"value": 1.5, "eval_set_hash": "e", "report": report}
    on = decide(_gate_cfg(require_beats_baseline=True), champ, build, rescore=lambda v: pytest.fail("rescored"))
    assert not on.promote and on.beats_baseline is False and on.tags()["mole.promotion.decision"] == "challenger"
    assert on.champion_version == "2" and on.champion_value == 2.0 and on.champion_source == "tag"
    assert on.improvement == pytest.approx(0.25)
    assert on.reason.startswith("mole does not beat its own baseline multitask_lora (loss 1.5000 vs 1.4000")
    assert "vs champion v2 2 (same eval set): relative improvement +25.000%" in on.reason
    off = decide(_gate_cfg(require_beats_baseline=False), champ, build, rescore=lambda v: pytest.fail("rescored"))
    assert off.promote and off.beats_baseline is False and "promoted to champion" in off.reason


def test_run_description_never_writes_a_none_url() -> None:
    from flows.comparison import run_tags, valid_url

    build = {"key": "k", "variant": "mole", "metric": "loss", "value": 1.0,
             "report": {"variants": {"mole": {"loss": 1.0, "exact_match": None}}}}  # fmt: skip
    tags = run_tags(build, None, "None/runs/1", None)
    assert "mlflow.source.git.commit" not in tags and "None/" not in tags["mlflow.note.content"]
    assert "Prefect" not in tags["mlflow.note.content"] and "DVC" not in tags["mlflow.note.content"]
    assert valid_url("http://x/flow-runs/flow-run/None") is None and valid_url(None) is None
    assert run_tags(build, "abc-dirty", "http://p/1", "/tmp/r")["mlflow.source.git.commit"] == "abc"


def test_pyfunc_input_shapes() -> None:
    from flows.pyfunc import generation_kwargs, prompts_of

    assert prompts_of(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert prompts_of({"prompt": ["a"]}) == ["a"] and prompts_of("a") == ["a"]
    with pytest.raises(ValueError, match="'prompt' column"):
        prompts_of(pd.DataFrame({"text": ["a"]}))
    assert generation_kwargs({"max_new_tokens": 3, "temperature": 0.0}) == {"max_new_tokens": 3, "raw": False}
    assert generation_kwargs({"raw": True})["raw"] is True
    assert generation_kwargs({"temperature": 0.7})["do_sample"] is True
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation_kwargs({"max_new_tokens": 0})
