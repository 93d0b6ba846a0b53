"""Merge and prune: factored algebra against dense references, merge/prune invariants, and the acceptance gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mole.base import load_base
from mole.config import BuildConfig
from mole.data.tokenize import eval_batches
from mole.io import write_jsonl
from mole.merge import (
    apply_plan,
    expert_similarity,
    factored_inner,
    merge_factored,
    plan,
    run_merge_prune,
    utilization,
)
from mole.nn.model import MoLEModel
from mole.nn.spec import MoLESpec
from mole.sections import MergeConfig

R = 4
WORDS = ["alpha beta gamma", "one two three four", "red green blue", "cat dog bird fish"]
ROWS = [{"id": f"r{i}", "text": f"{WORDS[i % 4]} {i} {WORDS[(i + 1) % 4]}"} for i in range(8)]


def _model(num_experts: int = 4, top_k: int = 2, random: bool = True, shared: str | None = None) -> MoLEModel:
    base, tok = load_base("tiny", seed=0)
    spec = MoLESpec(
        base_model={"name": "tiny", "seed": 0},
        expert_ids=[f"expert_{i:02d}" for i in range(num_experts)],
        r=R,
        lora_alpha=8.0,
        target_modules=["q_proj", "v_proj"],
        top_k=top_k,
        clusters=list(range(num_experts)),
        shared=shared,
    )
    model = MoLEModel(base=base, tokenizer=tok, spec=spec)
    if random:
        with torch.no_grad():
            for layer in model.bank.values():
                layer.lora_B.normal_(std=0.5)
            for router in model.routers:
                router.gate.weight.normal_(std=1.0)
    return model.eval()


def _ids(n: int = 3, t: int = 10) -> torch.Tensor:
    return torch.randint(3, 250, (n, t))


@torch.no_grad()
def _copy_expert(model: MoLEModel, src: int, dst: int) -> None:
    """Make expert ``dst`` identical to ``src``: its weights in every layer and its gate row and bias."""
    for layer in model.bank.values():
        layer.set_expert(dst, *layer.expert(src))
    for router in model.routers:
        router.gate.weight[dst] = router.gate.weight[src]
        router.gate.bias[dst] = router.gate.bias[src]


@torch.no_grad()
def _silence(model: MoLEModel, expert: int) -> None:
    """Make the router never select ``expert``."""
    for router in model.routers:
        router.gate.bias[expert] = -1e4


# ------------------------------------------------------------------------------------------------ factored algebra
def test_factored_inner_and_similarity_match_dense() -> None:
    g = torch.Generator().manual_seed(1)
    a_i, b_i = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    a_j, b_j = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    # The reference is formed in float64 from the float32 factors, as factored_inner computes: a float32 product
    # would round differently by CPU (MKL picks its kernels by instruction set) and miss float64's tolerance.
    dense = ((b_i.double() @ a_i.double()) * (b_j.double() @ a_j.double())).sum()
    torch.testing.assert_close(factored_inner(a_i, b_i, a_j, b_j), dense)

    model = _model()
    sim = expert_similarity(model)
    e = model.spec.num_experts
    ref = np.zeros((e, e))
    for layer in model.bank.values():
        dw = [(lambda a, b: b.double() @ a.double())(*layer.expert(i)) for i in range(e)]  # dense (d_out, d_in), fp64
        ref += np.array([[float((x * y).sum() / (x.norm() * y.norm())) for y in dw] for x in dw])
    np.testing.assert_allclose(sim, ref / len(model.bank), atol=1e-9)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-12)


def test_similarity_is_zero_for_an_expert_with_zero_delta() -> None:
    model = _model()
    with torch.no_grad():
        for layer in model.bank.values():
            a, b = layer.expert(1)
            layer.set_expert(1, a, torch.zeros_like(b))
    sim = expert_similarity(model)
    assert np.all(sim[1] == 0) and np.all(sim[:, 1] == 0)


def test_merge_factored_of_identical_experts_is_exact() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(R, 12, generator=g), torch.randn(9, R, generator=g)
    a2, b2 = merge_factored(a, b, a, b, 0.3, 0.7, R)
    assert a2.shape == a.shape and b2.shape == b.shape
    torch.testing.assert_close(b2 @ a2, b @ a, rtol=1e-5, atol=1e-5)


def test_merge_factored_is_the_best_rank_r_approximation() -> None:
    g = torch.Generator().manual_seed(3)
    a_i, b_i = torch.randn(R, 12, generator=g), torch.randn(9, R, generator=g)
    a_j, b_j = torch.randn(R, 12, generator=g), torch.randn(9, R, generator=g)
    a, b = merge_factored(a_i, b_i, a_j, b_j, 1.0, 3.0, R)  # weights normalised to 0.25, 0.75
    dense = 0.25 * b_i @ a_i + 0.75 * b_j @ a_j  # rank 2r
    u, s, vh = torch.linalg.svd(dense)
    best = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    torch.testing.assert_close(b @ a, best, rtol=1e-4, atol=1e-4)
    # ... and its error is the Eckart-Young minimum.
    assert torch.isclose((dense - b @ a).norm(), s[R:].norm(), rtol=1e-4)


# ----------------------------------------------------------------------------------------- merge / prune on models
def test_merging_identical_experts_keeps_the_outputs(tmp_path: Path) -> None:
    model = _model(num_experts=4, top_k=2)
    _copy_expert(model, 0, 1)
    sim = expert_similarity(model)
    assert sim[0, 1] == pytest.approx(1.0)
    decisions = plan(np.full(4, 0.25), sim, MergeConfig(utilization_floor=0.0, similarity_ceiling=0.999))
    assert [(d["action"], d["experts"]) for d in decisions] == [("merge", [0, 1])]
    merged = MoLEModel.from_pretrained(apply_plan(model, decisions, tmp_path / "m"))
    assert merged.spec.expert_ids == ["expert_00+expert_01", "expert_02", "expert_03"]
    assert merged.spec.clusters == [[0, 1], 2, 3]
    ids = _ids()
    with torch.no_grad():
        for old, new in ((0, 0), (1, 0), (2, 1), (3, 2)):  # forced routing: merged expert == either copy
            torch.testing.assert_close(
                merged(ids, route=torch.full((3,), new)).logits, model(ids, route=torch.full((3,), old)).logits
            )


def test_merging_identical_experts_keeps_dense_token_routing(tmp_path: Path) -> None:
    """With top_k = E the router is a full softmax; the merged row (mean, bias + log 2) has exactly the pair's mass.

    exp(l + log 2) = exp(l_0) + exp(l_1) when l_0 = l_1, so every other expert keeps its weight and the merged
    expert gets w_0 + w_1 on the same ΔW: the mixture, hence the logits, are unchanged (top_k becomes E - 1 = E').
    """
    model = _model(num_experts=3, top_k=3)
    _copy_expert(model, 0, 2)
    decisions = plan(np.full(3, 1 / 3), expert_similarity(model), MergeConfig(similarity_ceiling=0.999))
    merged = MoLEModel.from_pretrained(apply_plan(model, decisions, tmp_path / "m"))
    assert merged.spec.num_experts == 2 and merged.spec.top_k == 2
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_unused_expert_has_zero_utilization_and_is_pruned(tmp_path: Path) -> None:
    model = _model(num_experts=4, top_k=2)
    _silence(model, 2)
    util = utilization(model, ROWS, batch_size=4, max_length=32)
    assert util.shape == (4,) and util.sum() == pytest.approx(1.0)
    assert util[2] < 1e-6 and (np.delete(util, 2) > 0.02).all()
    sim = expert_similarity(model)
    decisions = plan(util, sim, MergeConfig(utilization_floor=0.02, similarity_ceiling=1.0), ids=model.spec.expert_ids)
    assert len(decisions) == 1
    d = decisions[0]
    assert (d["action"], d["expert"], d["id"], d["floor"]) == ("prune", 2, "expert_02", 0.02)
    assert d["utilization"] == pytest.approx(util[2]) and d["clusters_to"] == max((0, 1, 3), key=lambda j: sim[2, j])
    pruned = MoLEModel.from_pretrained(apply_plan(model, decisions, tmp_path / "p"))
    assert pruned.spec.expert_ids == ["expert_00", "expert_01", "expert_03"]
    assert sorted(pruned.spec.expert_of_cluster()) == [0, 1, 2, 3]  # cluster 2 is still served
    ids = _ids()
    with torch.no_grad():  # the expert was never selected, so token routing is exactly unchanged
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits)


def test_utilization_recorded_by_train_router_is_used_only_for_the_same_experts_and_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record train-router writes (``utilization_record`` of an all-token routing pass) equals merge-prune's own
    pass and replaces it; for other rows or other experts the pass runs."""
    import mole.merge
    from mole.routing.diagnostics import row_routings, utilization_record

    model = _model(num_experts=4, top_k=2)
    (_, _), (every, _) = row_routings(model, ROWS, batch_size=2, max_length=32, prompt_only=(True, False))
    record = tmp_path / "train_metrics.json"
    record.write_text(json.dumps({"utilization_all_tokens": utilization_record(model, ROWS, every)}))
    measured = utilization(model, ROWS, batch_size=4, max_length=32)
    other_rows = utilization(model, ROWS[:4], batch_size=4, max_length=32, recorded=record)
    np.testing.assert_allclose(other_rows, utilization(model, ROWS[:4], batch_size=4, max_length=32), atol=1e-12)

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("a routing pass ran although the record fits")

    monkeypatch.setattr(mole.merge, "row_routing", no_pass)
    np.testing.assert_allclose(utilization(model, ROWS, batch_size=4, max_length=32, recorded=record), measured,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    model.spec.expert_ids = ["a", "b", "c", "d"]  # another bank: the record is not its
    with pytest.raises(AssertionError, match="a routing pass ran"):
        utilization(model, ROWS, batch_size=4, max_length=32, recorded=record)


def test_plan_keeps_one_expert_and_merges_each_expert_once() -> None:
    cfg = MergeConfig(utilization_floor=0.5, similarity_ceiling=0.5)
    decisions = plan(np.array([0.1, 0.3, 0.2, 0.4]), np.eye(4), cfg)
    assert [d["expert"] for d in decisions] == [0, 2, 1]  # least used first; expert 3 survives
    sim = np.array([[1.0, 0.9, 0.8, 0.0], [0.9, 1.0, 0.95, 0.0], [0.8, 0.95, 1.0, 0.6], [0.0, 0.0, 0.6, 1.0]])
    merges = plan(np.full(4, 0.25), sim, MergeConfig(utilization_floor=0.0, similarity_ceiling=0.5))
    assert [(d["experts"], d["similarity"], d["weights"]) for d in merges] == [([1, 2], 0.95, [0.5, 0.5])]
    assert plan(np.full(4, 0.25), np.eye(4), MergeConfig(utilization_floor=0.0, similarity_ceiling=0.5)) == []


# ------------------------------------------------------------------------------------------------ the stage itself
def _workspace(ws: Path, model: MoLEModel, **merge: float | int) -> BuildConfig:
    """A minimal workspace: prepared rows and artifacts/mole (with a carried extra file), no pipeline run."""
    write_jsonl(ws / "data/prepared/train.jsonl", ROWS)
    write_jsonl(ws / "data/prepared/eval.jsonl", ROWS)
    model.save_pretrained(ws / "artifacts/mole", extra_json={"train_metrics.json": {"note": "carried"}})
    return BuildConfig.model_validate(
        {
            "workspace": str(ws),
            "base_model": {"name": "tiny"},
            "experts": {"max_length": 32},
            "router": {"batch_size": 4},
            "evaluate": {"batch_size": 4},
            "merge": merge,
        }
    )


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _fit_expert(model: MoLEModel, expert: int, steps: int = 10) -> None:
    """Train one expert alone (every token forced to it) on ROWS, so that it lowers their loss."""
    _, batch = next(eval_batches(ROWS, model.tokenizer, batch_size=len(ROWS), max_length=32))
    opt = torch.optim.Adam(model.expert_parameters(), lr=3e-2)  # the other experts get zero gradients
    route = torch.full((len(ROWS),), expert)
    for _ in range(steps):
        opt.zero_grad()
        model(batch["input_ids"], batch["attention_mask"], batch["labels"], route=route).lm_loss.backward()
        opt.step()
    model.eval()


def test_a_merge_that_raises_eval_loss_is_rejected_and_leaves_the_model_untouched(tmp_path: Path) -> None:
    """Merging two random experts the router never picks: the merged row's ``+ log 2`` beats the fitted expert.

    Gate logits are the biases (0, 0, 0.5) for every token, so top-1 sends everything to expert 2, fitted to the
    eval rows. The merged expert's logit is log 2 > 0.5, so with no re-fit every token goes to the random merged
    expert, the fit is lost and eval loss rises; the gate must refuse it and leave artifacts/mole as it was.
    """
    model = _model(num_experts=3, top_k=1, random=False)
    _fit_expert(model, 2)
    with torch.no_grad():
        for layer in model.bank.values():
            a, b = layer.expert(0)
            b = torch.randn_like(b)
            layer.set_expert(0, a, b)
            layer.set_expert(1, a + torch.randn_like(a) * a.std(), b + torch.randn_like(b))  # cosine ~0.5 to expert 0
        for router in model.routers:
            router.gate.weight.zero_()
            router.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    cfg = _workspace(tmp_path, model, similarity_ceiling=-0.99, utilization_floor=0.0, refit_steps=0, tolerance=0.0)
    before = _snapshot(tmp_path / "artifacts/mole")
    summary = run_merge_prune(cfg)
    report = json.loads((tmp_path / "reports/merge_prune.json").read_text())
    assert summary["accepted"] is False and report["accepted"] is False
    assert report["relative_change"] > MergeConfig().tolerance  # refused by any sensible tolerance, not a rounding
    (d,) = report["decisions"]
    assert d["action"] == "merge" and d["experts"] == [0, 1] and d["weights"] == [0.5, 0.5]  # both unused
    assert 0 < d["similarity"] < MergeConfig().similarity_ceiling and d["ceiling"] == -0.99  # a dissimilar pair
    after = _snapshot(tmp_path / "artifacts/mole")
    history = json.loads(after.pop("utilization.json"))["history"]  # the one file added: this build's utilization
    assert after == before and [list(h["utilization"].values()) for h in history] == [report["utilization"]]
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["mole"]  # no temp dir, no keep_dir


def test_an_accepted_prune_replaces_the_model_and_keeps_the_original(tmp_path: Path) -> None:
    model = _model(num_experts=4, top_k=2)
    _silence(model, 1)
    cfg = _workspace(tmp_path, model, utilization_floor=0.02, similarity_ceiling=1.0, refit_steps=2, tolerance=0.02)
    keep = tmp_path / "artifacts/mole.unmerged"
    keep.mkdir()
    (keep / "stale").write_text("from an earlier run")
    before = _snapshot(tmp_path / "artifacts/mole")
    summary = run_merge_prune(cfg)
    assert summary["accepted"] is True and summary["experts_before"] == 4 and summary["experts_after"] == 3
    kept, history = _snapshot(keep), (tmp_path / "artifacts/mole/utilization.json").read_bytes()
    assert kept.pop("utilization.json") == history  # written before planning, carried into the pruned model
    assert kept == before  # the original moved, byte for byte; the stale keep_dir is gone
    new = MoLEModel.from_pretrained(tmp_path / "artifacts/mole")
    assert new.spec.expert_ids == ["expert_00", "expert_02", "expert_03"]
    assert json.loads((tmp_path / "artifacts/mole/train_metrics.json").read_text()) == {"note": "carried"}
    report = json.loads((tmp_path / "reports/merge_prune.json").read_text())
    (d,) = report["decisions"]
    assert d["action"] == "prune" and d["expert"] == 1 and d["utilization"] < 1e-6 and d["floor"] == 0.02
    assert report["accepted"] and report["relative_change"] < 0.02 and report["tolerance"] == 0.02
    assert len(report["utilization"]) == 4 and np.asarray(report["similarity"]).shape == (4, 4)
    assert report["adapter_mb_after"] < report["adapter_mb_before"] and report["refit"]["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["mole", "mole.unmerged"]


def test_merge_and_prune_leave_the_shared_expert_alone(tmp_path: Path) -> None:
    """The shared slot is never a merge or prune candidate and is carried into the new bank unchanged."""
    from mole.merge import apply_plan

    model = _model(num_experts=4, top_k=2, shared="shared")
    _copy_expert(model, 0, 2)  # experts 0 and 2 identical: a merge; the shared slot differs from every expert
    sim = expert_similarity(model)
    assert sim.shape == (4, 4) and sim[0, 2] == pytest.approx(1.0)
    decisions = [{"action": "merge", "experts": [0, 2], "weights": [0.5, 0.5]},
                 {"action": "prune", "expert": 3, "clusters_to": 1}]  # fmt: skip
    out = MoLEModel.from_pretrained(apply_plan(model, decisions, tmp_path / "merged"))
    assert out.spec.num_experts == 2 and out.spec.shared == "shared"
    for name, layer in model.bank.items():
        for got, want in zip(out.bank[name].expert(out.shared_index), layer.expert(model.shared_index), strict=True):
            assert torch.equal(got, want)
