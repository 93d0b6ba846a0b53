"""The evaluate stage on a tiny workspace built once: eval.json shape and invariants, eval.md, plots, add_variant."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mole import stages, workspace
from mole.config import BuildConfig, load_config
from mole.eval.evaluate import (
    ModelScorer,
    add_variant,
    evaluate_variant,
    normalize_answer,
    reporting,
    run_evaluate,
)
from mole.eval.metrics import same_routes
from mole.io import read_jsonl

VARIANTS = ("base", "multitask_lora", "oracle_experts", "cluster_routing", "mole")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small everywhere: tf-idf clusters (no sentence-transformer load), 3 experts, a few steps, short generations.
OVERRIDES = [
    "data.demo_rows_per_skill=12",
    "cluster.embedder=tfidf",
    "cluster.k=3",
    "experts.steps=3",
    "router.steps=2",
    "evaluate.generate_rows=8",
    "evaluate.max_new_tokens=6",
    "evaluate.latency_reps=2",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuildConfig, dict[str, Any]]:
    ws = tmp_path_factory.mktemp("eval_ws")
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={ws}", *OVERRIDES])
    assert cfg.path("data") == ws / "data"  # every stage writes under the workspace, not the cwd
    for stage in (stages.prepare, stages.cluster, stages.train_experts, stages.train_router):
        stage(cfg)
    return cfg, run_evaluate(cfg)


@pytest.fixture(scope="module")
def eval_rows(built: tuple[BuildConfig, dict[str, Any]]) -> list[dict[str, Any]]:
    return read_jsonl(workspace.prepared_paths(built[0])["eval"])


def test_every_variant_has_finite_metrics(built: tuple[BuildConfig, dict[str, Any]]) -> None:
    cfg, report = built
    on_disk = json.loads((cfg.path(cfg.evaluate.out_dir) / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(report) == {"variants", "routing", "clustering", "cost", "training", "verdict"}
    assert list(report["variants"]) == list(VARIANTS)
    for name, v in report["variants"].items():
        assert set(v) == {"loss", "ppl", "exact_match", "tokens", "per_cluster"}, name
        assert math.isfinite(v["loss"]) and math.isfinite(v["ppl"]), name
        assert v["ppl"] == pytest.approx(math.exp(v["loss"]))
        assert 0.0 <= v["exact_match"] <= 1.0, name  # demo rows are prompt/completion
        assert v["tokens"] > 0


def test_per_cluster_rows_cover_the_eval_split(built: tuple[BuildConfig, dict[str, Any]], eval_rows: list) -> None:
    cfg, report = built
    assigned = read_jsonl(workspace.cluster_paths(cfg)["eval_assignments"])
    expected = {str(c): sum(a["cluster"] == c for a in assigned) for c in {a["cluster"] for a in assigned}}
    for v in report["variants"].values():
        assert {c: p["rows"] for c, p in v["per_cluster"].items()} == expected
        assert sum(p["rows"] for p in v["per_cluster"].values()) == len(eval_rows)
        # The overall loss is the token-weighted mean of the clusters' losses, so it lies within their range.
        losses = [p["loss"] for p in v["per_cluster"].values()]
        assert min(losses) - 1e-9 <= v["loss"] <= max(losses) + 1e-9


def test_routing_statistics(built: tuple[BuildConfig, dict[str, Any]], eval_rows: list) -> None:
    from mole.nn.model import MoLEModel
    from mole.routing.diagnostics import routing_agreement, row_routing

    cfg, report = built
    r = report["routing"]
    assert sum(r["utilization"]) == pytest.approx(1.0, abs=1e-4)
    assert len(r["utilization_per_layer"]) == 2  # the tiny base has 2 blocks
    for layer in r["utilization_per_layer"]:
        assert len(layer) == 3 and sum(layer) == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= r["normalized_entropy"] <= 1.0 + 1e-9
    assert r["entropy"] == pytest.approx(r["normalized_entropy"] * math.log(3))
    assert 0.0 <= r["top1_agreement"] <= 1.0
    model = MoLEModel.from_pretrained(workspace.mole_paths(cfg)["dir"])
    clusters = {a["id"]: a["cluster"] for a in read_jsonl(workspace.cluster_paths(cfg)["eval_assignments"])}
    experts = [model.spec.expert_of_cluster()[clusters[row["id"]]] for row in eval_rows]
    _, logits = row_routing(model, eval_rows, batch_size=cfg.evaluate.batch_size, max_length=cfg.experts.max_length)
    assert r["top1_agreement"] == pytest.approx(routing_agreement(logits, experts))


def test_clustering_and_cost(built: tuple[BuildConfig, dict[str, Any]]) -> None:
    cfg, report = built
    assert report["clustering"]["k"] == 3 and set(report["clustering"]) == {"k", "silhouette", "ari", "k_rule"}
    cost = report["cost"]
    assert cost["trainable_params"] > 0 and cost["adapter_mb"] > 0
    assert cost["base_ms"] > 0 and cost["mole_ms"] > 0
    assert cost["latency_ratio_vs_base"] == pytest.approx(cost["mole_ms"] / cost["base_ms"])


def test_the_model_card_has_front_matter_experts_and_the_eval_numbers(
    built: tuple[BuildConfig, dict[str, Any]],
) -> None:
    from mole.eval.card import front_matter

    cfg, report = built
    card = (cfg.path(cfg.evaluate.out_dir) / "model_card.md").read_text()
    front = front_matter(card)
    assert front["base_model"] == "tiny" and front["library_name"] == "peft" and "mole" in front["tags"]
    assert front["mole"]["eval"]["mole"]["loss"] == report["variants"]["mole"]["loss"]  # full precision
    assert front["mole"]["beats_baseline"] == report["verdict"]["beats_baseline"]
    spec = json.loads(workspace.mole_paths(cfg)["config"].read_text())
    sizes = json.loads(workspace.cluster_paths(cfg)["report"].read_text())["sizes"]
    for eid, c in zip(spec["expert_ids"], spec["clusters"], strict=True):
        assert f"| {eid} | {c} | {sizes[c]} |" in card
    assert f"| mole | {report['variants']['mole']['loss']:.4f} |" in card
    assert report["verdict"]["headline"] in card and "train rows sha256" in card


def test_build_time_of_every_stage_and_its_training_share(built: tuple[BuildConfig, dict[str, Any]]) -> None:
    cfg, report = built
    bt = report["cost"]["build_time"]
    assert list(bt["stages"]) == ["prepare", "cluster", "train-experts", "train-router", "evaluate"]
    assert all(v > 0 for v in bt["stages"].values()) and bt["total"] == pytest.approx(sum(bt["stages"].values()))
    index = json.loads(workspace.experts_paths(cfg)["index"].read_text())
    if index["shared_mode"] == "cotrained":  # one run, whose seconds every entry records: counted once
        assert bt["training"]["experts"] == 0 and bt["training"]["shared"] == index["shared"]["seconds"]
    else:
        assert bt["training"]["experts"] == pytest.approx(sum(e["seconds"] for e in index["experts"]))
    joint = json.loads(workspace.mole_paths(cfg)["metrics"].read_text())["joint"]["seconds"]
    share = (bt["training"]["shared"] + bt["training"]["experts"] + joint) / bt["total"]
    assert bt["training_fraction"] == pytest.approx(share) and 0 < share < 1
    with_baseline = share + bt["training"]["multitask_lora"] / bt["total"]
    assert bt["training_fraction_with_baseline"] == pytest.approx(with_baseline) and share < with_baseline < 1
    md = (cfg.path(cfg.evaluate.out_dir) / "eval.md").read_text()
    assert "- build time (latest run of each stage): prepare" in md and "in training steps" in md


def test_markdown_and_plots(built: tuple[BuildConfig, dict[str, Any]]) -> None:
    cfg, _ = built
    out = cfg.path(cfg.evaluate.out_dir)
    md = (out / "eval.md").read_text()
    for name in VARIANTS:
        assert f"| {name} |" in md
    assert "top-1 agreement" in md and "trainable parameters" in md
    for png in (
        "loss_curves.png",
        "per_cluster_loss.png",
        "routing_heatmap.png",
        "variants.png",
        "cluster_map.png",
        "token_routing.png",
    ):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
    assert not list(out.glob(".mole-tmp-*"))


def test_training_compute_of_every_variant_is_recorded(built: tuple[BuildConfig, dict[str, Any]]) -> None:
    from mole.training.experts import multitask_steps

    cfg, report = built
    t = report["training"]
    index = json.loads((cfg.path(cfg.experts.out_dir) / "experts.json").read_text())
    tokens = {e["id"]: json.loads((cfg.path(e["path"]) / "train_metrics.json").read_text())["tokens"]
              for e in [*index["experts"], index["shared"], index["baseline"]]}  # fmt: skip
    joint = json.loads((workspace.mole_paths(cfg)["metrics"]).read_text())["joint"]
    # experts.shared = cotrained: one run trained the shared adapter and the experts; its entry holds the run's tokens
    assert cfg.experts.shared == "cotrained" and t["mole"]["tokens"] == tokens["shared"] + joint["tokens"]
    assert t["mole"]["phases"]["cotrained"]["tokens"] == tokens["shared"]
    assert t["mole"]["steps"] == cfg.experts.shared_steps + 3 * 3 + 2  # the run (shared + 3 experts' steps) + joint
    assert t["multitask_lora"]["steps"] == multitask_steps(cfg, 3) and t["multitask_lora"]["tokens"] == tokens[
        "multitask_lora"]  # fmt: skip
    # top-k experts plus the always-on shared one
    assert t["mole"]["rank"] == cfg.experts.lora.r * (cfg.router.top_k + 1)
    assert t["multitask_lora"]["rank"] >= t["mole"]["rank"] and t["base"] == {"steps": 0, "tokens": 0, "rank": 0}
    # The baseline sees as many training rows as the mixture, so about as many tokens (rows differ in length).
    assert t["multitask_lora"]["tokens"] == pytest.approx(t["mole"]["tokens"], rel=0.25)


def test_eval_md_opens_with_the_verdict(built: tuple[BuildConfig, dict[str, Any]]) -> None:
    cfg, report = built
    v = report["verdict"]
    mole, base = report["variants"]["mole"], report["variants"]["multitask_lora"]
    assert v["baseline"] == "multitask_lora" and v["variant"] == "mole"
    beats = mole["loss"] < base["loss"] and mole["exact_match"] >= base["exact_match"]
    assert v["beats_baseline"] is beats
    assert v["relative_loss"] == pytest.approx((mole["loss"] - base["loss"]) / base["loss"])
    first = (cfg.path(cfg.evaluate.out_dir) / "eval.md").read_text().splitlines()[2]
    assert first.startswith("**The mixture (mole) " + ("beats" if beats else "does NOT beat"))
    assert f"{mole['loss']:.4f} vs {base['loss']:.4f}" in first


def test_add_variant_keeps_the_others(built: tuple[BuildConfig, dict[str, Any]], tmp_path: Path) -> None:
    cfg, report = built
    path = shutil.copy(cfg.path(cfg.evaluate.out_dir) / "eval.json", tmp_path / "eval.json")
    merged = {**report["variants"]["mole"], "loss": 1.0, "ppl": math.e}
    updated = add_variant(path, "mole_merged", merged)
    on_disk = json.loads(Path(path).read_text())
    assert list(on_disk["variants"]) == [*VARIANTS, "mole_merged"] and on_disk == updated
    assert on_disk["variants"]["base"] == json.loads(json.dumps(report["variants"]["base"]))
    assert on_disk["routing"] == json.loads(json.dumps(report["routing"]))
    assert on_disk["verdict"]["variant"] == "mole_merged"  # the verdict follows the model that is registered
    assert "| mole_merged | 1.0000 | 2.72 |" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / "per_cluster_loss.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_baseline_is_skipped_with_a_warning(
    built: tuple[BuildConfig, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    from mole.eval.evaluate import _multitask_lora

    cfg = built[0].model_copy(update={"experts": built[0].experts.model_copy(update={"baseline_dir": "nowhere"})})
    with caplog.at_level(logging.WARNING, logger="mole.eval.evaluate"):
        assert _multitask_lora(cfg, None, None, [], []) is None
    assert "skipping the baseline" in caplog.text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Paris.  ", "paris"),
        ("2025-12-14\nQuestion: next", "2025-12-14"),
        ("New   York\tCity", "new york city"),
        ("3.14", "3.14"),
        ("Alice .", "alice"),
        ("", ""),
        ("\nlate answer", ""),  # the first line is empty: the answer must come first
        ("ÉCOLE", "école"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_evaluate_variant_matches_a_hand_computation() -> None:
    from mole.base import build_tiny
    from mole.data.tokenize import encode_row

    model, tok = build_tiny(seed=1)
    rows = [
        {"id": "a", "text": "the quick brown fox jumps"},
        {"id": "b", "prompt": "2 + 2 =", "completion": "4"},
    ]
    nll, count = [], []
    for row in rows:  # one row at a time: no padding involved
        enc = encode_row(tok, row, max_length=64)
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        keep = labels[1:] != -100
        nll.append(torch.nn.functional.cross_entropy(logits[keep], labels[1:][keep], reduction="sum").item())
        count.append(int(keep.sum()))
    got = evaluate_variant(
        "hand", ModelScorer(model, tok), rows, [0, 1], batch_size=2, max_length=64, generate=lambda rs: ["4.\nx"]
    )
    assert got["tokens"] == sum(count) == len("the quick brown fox jumps") + 1 + len(" 4") + 1  # bytes + eos
    assert got["loss"] == pytest.approx(sum(nll) / sum(count), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(sum(nll) / sum(count)), rel=1e-5)
    assert got["per_cluster"]["0"]["loss"] == pytest.approx(nll[0] / count[0], rel=1e-5)
    assert got["per_cluster"]["1"] == {**got["per_cluster"]["1"], "exact_match": 1.0, "rows": 1}
    assert got["exact_match"] == 1.0 and got["per_cluster"]["0"]["exact_match"] is None  # text rows have no answer
    assert [r["loss"] for r in got["per_row"]] == pytest.approx(
        [n / c for n, c in zip(nll, count, strict=True)], rel=1e-5
    )
    assert [r["completion"] for r in got["per_row"]] == [None, "4.\nx"]  # only rows with an answer are generated
    no_gen = evaluate_variant("hand", ModelScorer(model, tok), rows[:1], [0], batch_size=2, max_length=64)
    assert no_gen["exact_match"] is None

    # progress: after each scoring batch (rows done, running loss), then after each generation batch
    calls: list[tuple] = []
    with reporting(lambda *a: calls.append(a)):
        evaluate_variant("hand", ModelScorer(model, tok), rows, [0, 1], batch_size=1, max_length=64,
                         generate=lambda rs: ["4"])  # fmt: skip
    evaluate_variant("hand", ModelScorer(model, tok), rows, [0, 1], batch_size=1, max_length=64)  # outside: no calls
    assert [c[:3] for c in calls] == [("eval hand", 1, 3), ("eval hand", 2, 3), ("eval hand", 3, 3)]
    assert [c[3] for c in calls] == pytest.approx([nll[0] / count[0], *[sum(nll) / sum(count)] * 2], rel=1e-5)


def _completion_rows(cfg: BuildConfig, eval_rows: list) -> tuple[list, list[int]]:
    clusters = {a["id"]: a["cluster"] for a in read_jsonl(workspace.cluster_paths(cfg)["eval_assignments"])}
    rows = [r for r in eval_rows if "completion" in r][:8]
    return rows, [clusters[r["id"]] for r in rows]


def test_decoding_many_prompts_at_once_gives_the_completions_of_one_at_a_time(
    built: tuple[BuildConfig, dict[str, Any]], eval_rows: list
) -> None:
    """Equal outputs: greedy completions (and losses) of a variant decoded in one left-padded batch are those decoded
    prompt by prompt, for the base, a forced route mixing experts in the batch, and the token routers."""
    from mole.base import load_configured_base
    from mole.eval.metrics import fixed_route, hf_generator, mole_generator
    from mole.nn.model import MoLEModel

    cfg, _ = built
    rows, clusters = _completion_rows(cfg, eval_rows)
    base, tok = load_configured_base(cfg)
    model = MoLEModel.from_pretrained(workspace.mole_paths(cfg)["dir"])
    model.merge_forced = False  # one prompt at a time would merge its expert: compare the same arithmetic
    route = fixed_route(rows, [i % model.spec.num_experts for i in range(len(rows))])
    cases = {"base": (ModelScorer(base, tok), hf_generator(base, tok, max_new_tokens=6)),
             "forced": (ModelScorer(model, model.tokenizer, route),
                        mole_generator(model, max_new_tokens=6, route=route)),
             "mole": (ModelScorer(model, model.tokenizer), mole_generator(model, max_new_tokens=6))}  # fmt: skip
    for name, (scorer, gen) in cases.items():
        kw = {"batch_size": 4, "max_length": cfg.experts.max_length, "generate": gen}
        one = evaluate_variant(name, scorer, rows, clusters, generate_batch_size=1, **kw)
        many = evaluate_variant(name, scorer, rows, clusters, generate_batch_size=len(rows), **kw)
        assert [r["completion"] for r in many["per_row"]] == [r["completion"] for r in one["per_row"]], name
        assert many["exact_match"] == one["exact_match"] and many["loss"] == one["loss"], name


def test_the_mole_scoring_pass_gives_the_losses_and_routing_of_separate_passes(
    built: tuple[BuildConfig, dict[str, Any]], eval_rows: list
) -> None:
    from mole.eval.metrics import RoutedScorer
    from mole.nn.model import MoLEModel
    from mole.routing.diagnostics import row_routing

    cfg, report = built
    model = MoLEModel.from_pretrained(workspace.mole_paths(cfg)["dir"])
    clusters = {a["id"]: a["cluster"] for a in read_jsonl(workspace.cluster_paths(cfg)["eval_assignments"])}
    kw = {"batch_size": cfg.evaluate.batch_size, "max_length": cfg.experts.max_length}
    routed = RoutedScorer(model, model.tokenizer)
    one = evaluate_variant("mole", routed, eval_rows, [clusters[r["id"]] for r in eval_rows], **kw)
    alone = evaluate_variant("mole", ModelScorer(model, model.tokenizer), eval_rows,
                             [clusters[r["id"]] for r in eval_rows], **kw)  # fmt: skip
    assert one["loss"] == alone["loss"] == pytest.approx(report["variants"]["mole"]["loss"], abs=1e-6)
    for got, want in zip(routed.routing(), row_routing(model, eval_rows, **kw), strict=True):
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-6, rtol=1e-6)


def test_the_baseline_on_the_shared_base_scores_as_on_a_fresh_one_and_gives_the_base_back(
    built: tuple[BuildConfig, dict[str, Any]], eval_rows: list
) -> None:
    from peft import PeftModel

    from mole.base import load_configured_base
    from mole.eval.evaluate import _multitask_lora
    from mole.eval.metrics import hf_generator

    cfg, _ = built
    rows, clusters = _completion_rows(cfg, eval_rows)
    base, tok = load_configured_base(cfg)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    shared = _multitask_lora(cfg, base, tok, rows, clusters)
    assert base.state_dict().keys() == before.keys()  # the LoRA layers are gone
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    fresh = PeftModel.from_pretrained(load_configured_base(cfg)[0], str(workspace.experts_paths(cfg)["baseline"]))
    kw = {"batch_size": cfg.evaluate.batch_size, "max_length": cfg.experts.max_length}
    alone = evaluate_variant("multitask_lora", ModelScorer(fresh.eval(), tok), rows, clusters, **kw,
                             generate=hf_generator(fresh, tok, max_new_tokens=cfg.evaluate.max_new_tokens))  # fmt: skip
    assert shared["loss"] == pytest.approx(alone["loss"], abs=1e-6)
    assert [r["completion"] for r in shared["per_row"]] == [r["completion"] for r in alone["per_row"]]


def test_a_variant_that_routes_every_row_as_an_earlier_one_is_not_scored_again() -> None:
    assert same_routes({"oracle_experts": [0, 1, 1], "cluster_routing": [0, 1, 1]}) == {
        "cluster_routing": "oracle_experts"
    }
    assert same_routes({"oracle_experts": [0, 1, 1], "cluster_routing": [0, 1, 0]}) == {}
    assert same_routes({"a": [2], "b": [2], "c": [2]}) == {"b": "a", "c": "a"}


def test_cluster_routing_repeating_the_oracle_gets_its_scores(
    built: tuple[BuildConfig, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With cluster routing made to pick each row's own expert, it is not scored again and equals the oracle."""
    import mole.eval.evaluate as ev
    from mole.nn.model import MoLEModel

    cfg, _ = built
    _, _, groups, _ = ev.eval_inputs(cfg)

    def own_experts(self: MoLEModel, texts: list[str]) -> torch.Tensor:
        expert_of = self.spec.expert_of_cluster()
        return torch.tensor([expert_of[g] for g in groups])

    monkeypatch.setattr(MoLEModel, "route_by_cluster", own_experts)
    scored: list[str] = []
    evaluate_variant_ = ev.evaluate_variant
    monkeypatch.setattr(
        ev, "evaluate_variant", lambda name, *a, **k: (scored.append(name), evaluate_variant_(name, *a, **k))[1]
    )
    report = run_evaluate(cfg)
    assert "cluster_routing" not in scored and "oracle_experts" in scored and "mole" in scored
    assert report["variants"]["cluster_routing"] == report["variants"]["oracle_experts"]
