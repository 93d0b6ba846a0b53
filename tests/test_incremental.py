"""Incremental builds from a previous model: reuse, update and add experts, or fall back to a full build.

The stages run for real on the tiny preset (a tiny random Llama, MiniLM clustering of demo rows); the data are
local files, so the build after adds exactly the rows a test names to those of the build before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mole.cluster.clustering import Clusterer, cluster_radii
from mole.cluster.incremental import extend_clusters
from mole.config import BuildConfig, load_config
from mole.data.demo import generate_demo_corpus
from mole.training.lifecycle import continued_lr, proportional

# Light settings: fixed k, few steps, no multitask baseline, a short joint phase.
LIGHT = ["experts.steps=4", "experts.shared_steps=4", "experts.multitask_baseline=false", "router.steps=2",
         "router.warm_start_method=means", "router.warm_start_rows=48", "merge.refit_steps=0"]  # fmt: skip


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as a JSONL data file at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def demo_by_skill(rows_per_skill: int) -> dict[str, list[dict[str, Any]]]:
    """The demo corpus's rows, by skill."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in generate_demo_corpus(rows_per_skill=rows_per_skill, seed=0):
        by.setdefault(r["domain"], []).append(r)
    return by


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Demo rows by skill, and a fixed eval file (so the train rows of two builds differ only as a test says)."""
    root = tmp_path_factory.mktemp("data")
    by = demo_by_skill(40)
    skills = sorted(by)
    evals = write_rows(root / "eval.jsonl", [r for s in skills for r in by[s][:4]])
    return {"root": root, "by": by, "skills": skills, "eval": evals}


def _cfg(ws: Path, source: Path, evals: Path, *extra: str) -> BuildConfig:
    sets = [f"workspace={ws}", f"data.source={source}", f"data.eval_source={evals}", *LIGHT, *extra]
    return load_config(None, preset="tiny", overrides=sets)


def _build(cfg: BuildConfig, *, until: str = "train_router") -> None:
    from mole import stages

    for name in ("prepare", "cluster", "train_experts", "train_router"):
        getattr(stages, name)(cfg)
        if name == until:
            return


def _hashes(ws: Path) -> dict[str, dict[str, Any]]:
    from mole.nn.lineage import model_experts

    return model_experts(ws / "artifacts" / "mole")


@pytest.fixture(scope="module")
def previous(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full build on 18 rows of each of the six skills."""
    ws = tmp_path_factory.mktemp("previous")
    rows = [r for s in data["skills"] for r in data["by"][s][4:22]]
    _build(_cfg(ws, write_rows(data["root"] / "v1.jsonl", rows), data["eval"], "cluster.k=6"))
    return ws


def test_fine_tuning_steps_are_proportional_to_the_new_rows() -> None:
    assert proportional(8, 6, 18) == 3
    assert proportional(8, 1, 1000) == 1
    assert proportional(8, 40, 18) == 8


def _two_clusters() -> tuple[np.random.Generator, np.ndarray, np.ndarray, Clusterer]:
    """Two old 2-D clusters of 20 rows, at (0, 0) and (5, 0), and their clusterer (rows embed as their text "x,y")."""
    from mole.cluster.embed import TfidfEmbedder

    class Fixed(TfidfEmbedder):  # embeddings given by the row text "x,y"
        def encode(self, texts: list[str]) -> np.ndarray:
            return np.array([[float(v) for v in t.split(",")] for t in texts], dtype=np.float32)

    rng = np.random.default_rng(0)
    old = np.concatenate([rng.normal((0, 0), 0.1, (20, 2)), rng.normal((5, 0), 0.1, (20, 2))])
    labels = np.repeat([0, 1], 20)
    centroids = np.stack([old[:20].mean(0), old[20:].mean(0)]).astype(np.float32)
    return rng, old, labels, Clusterer(Fixed(), centroids, cluster_radii(old, labels, centroids, 0.95))


def _extend(clusterer: Clusterer, points: np.ndarray, labels: np.ndarray) -> tuple[Clusterer, np.ndarray, dict]:
    """``extend_clusters`` over rows at ``points``, the first ``len(labels)`` of them old rows with those labels."""
    rows = [{"id": f"r{i}", "text": f"{x},{y}"} for i, (x, y) in enumerate(points)]
    old_labels = {f"r{i}": int(c) for i, c in enumerate(labels)}
    return extend_clusters(clusterer, rows, old_labels, min_cluster_size=4, quantile=0.95, k_max=4, n_init=2, seed=0)


def test_far_rows_of_a_new_kind_make_one_new_cluster_and_near_rows_join_theirs() -> None:
    rng, old, labels, clusterer = _two_clusters()
    near = rng.normal((5, 0), 0.05, (3, 2))
    far = rng.normal((0, 6), 0.1, (6, 2))
    ext, got, info = _extend(clusterer, np.concatenate([old, near, far]), labels)
    assert ext.k == 3 and info["new_clusters"] == [2]
    assert (got[:40] == labels).all() and info["disagreement"] == 0.0
    assert (got[43:] == 2).all() and len(ext.radii) == 3
    assert (got[40:43] == 1).sum() >= 2  # the near rows join the cluster they are near (one may fall past its radius)


def test_far_rows_at_the_edges_of_old_clusters_make_no_new_cluster() -> None:
    """Outliers of two old clusters (past their radii, around each): no grouping of them is as tight as an old
    cluster and each group sits inside an old cluster, so they join their nearest clusters instead."""
    _, old, labels, clusterer = _two_clusters()
    ring = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)], dtype=np.float32)  # one step out, all around
    ext, got, info = _extend(clusterer, np.concatenate([old, ring, ring + (5, 0)]), labels)
    assert info["far_rows"] == 8 and info["new_clusters"] == [] and ext.k == 2
    assert got[40:44].tolist() == [0] * 4 and got[44:].tolist() == [1] * 4


@pytest.mark.slow
def test_rows_added_to_one_cluster_update_its_expert_and_reuse_the_others_byte_for_byte(
    data: dict[str, Any], previous: Path, tmp_path: Path
) -> None:
    grown = "arithmetic"
    rows = [r for s in data["skills"] for r in data["by"][s][4:22]] + data["by"][grown][22:28]
    cfg = _cfg(tmp_path, write_rows(tmp_path / "v2.jsonl", rows), data["eval"], "build.incremental=always",
               f"build.previous={previous}")  # fmt: skip
    _build(cfg)
    old, new = _hashes(previous), _hashes(tmp_path)
    assert set(old) == set(new)
    lifecycle = json.loads((tmp_path / "reports" / "lifecycle.json").read_text())
    assert lifecycle["mode"] == "incremental" and lifecycle["new_rows"] == 6
    status = {e["id"]: e["status"] for e in lifecycle["experts"]}
    updated = [e for e, s in status.items() if s == "updated" and e != "shared"]
    assert len(updated) == 1 and status["shared"] == "updated"
    assert [e for e, s in status.items() if s == "reused"] == [e for e in new if e not in (*updated, "shared")]
    for eid in new:
        if status[eid] == "reused":
            assert new[eid]["sha256"] == old[eid]["sha256"], f"{eid} changed"
        else:  # fine-tuned from the previous weights: different, and its lineage names the old ones
            assert new[eid]["sha256"] != old[eid]["sha256"]
            assert new[eid]["parents"][0]["sha256"] == old[eid]["sha256"]
            assert new[eid]["lifecycle"] == "updated"
    (grown_expert,) = updated
    entry = next(e for e in lifecycle["experts"] if e["id"] == grown_expert)
    assert entry["new_rows"] == 6 and entry["steps"] == proportional(4, 6, 18) and entry["loss_before"] is not None
    # Fine-tuned where a schedule stretched over the rows now would stand, not restarted at the peak lr.
    e = cfg.experts
    lr = {a: json.loads((tmp_path / "artifacts" / "experts" / a / "train_metrics.json").read_text())["lr"]
          for a in (grown_expert, "shared")}  # fmt: skip
    scale = e.expert_lr_scale if e.shared == "cotrained" else 1.0
    assert lr[grown_expert] == pytest.approx(e.lr * continued_lr(6, 18) * scale)
    assert lr["shared"] == pytest.approx(e.lr * continued_lr(6, 108)) and continued_lr(6, 18) == 0.25
    router = json.loads((tmp_path / "artifacts" / "mole" / "train_metrics.json").read_text())
    assert router["warm_start"]["method"] == "previous" and router["warm_start"]["refit_steps"] == 1
    assert router["first_gate"]["rows"] == len(rows)  # the first-token gate: fitted anew on every training row


@pytest.mark.slow
def test_rows_of_a_new_skill_make_exactly_one_new_expert(data: dict[str, Any], tmp_path: Path) -> None:
    held_out, kept = data["skills"][0], data["skills"][1:]
    first = tmp_path / "first"
    rows = [r for s in kept for r in data["by"][s][4:22]]
    _build(_cfg(first, write_rows(tmp_path / "v1.jsonl", rows), data["eval"], "cluster.k=5"))
    second = tmp_path / "second"
    rows += data["by"][held_out][4:22]
    cfg = _cfg(second, write_rows(tmp_path / "v3.jsonl", rows), data["eval"], "build.incremental=always",
               f"build.previous={first}", "experts.shared_steps=6")  # fmt: skip
    _build(cfg)
    lifecycle = json.loads((second / "reports" / "lifecycle.json").read_text())
    added = [e for e in lifecycle["experts"] if e["status"] == "added"]
    assert lifecycle["mode"] == "incremental" and lifecycle["k"] == 6
    assert [e["id"] for e in added] == ["expert_05"] and added[0]["rows"] >= 4
    assert added[0]["steps"] == 6 > cfg.experts.steps  # a kind of row nothing learned yet: the shared adapter's steps
    # Only a new kind of row: every kept expert and the shared adapter they were trained on stay as they were
    # (experts.shared_update: auto), so the old skills' losses do not move with them.
    assert {e["id"]: e["status"] for e in lifecycle["experts"] if e["status"] != "added"} == {
        **{f"expert_{i:02d}": "reused" for i in range(5)},
        "shared": "reused",
    }
    old, new = _hashes(first), _hashes(second)
    assert all(new[i]["sha256"] == old[i]["sha256"] for i in old)
    assigned = [json.loads(line) for line in (second / "data/clusters/assignments.jsonl").read_text().splitlines()]
    domains = {a["domain"] for a in assigned if a["cluster"] == 5}
    assert domains == {held_out}
    # The router keeps the previous gate rows of the five experts and fits a sixth for the new one.
    router = json.loads((second / "artifacts" / "mole" / "train_metrics.json").read_text())
    warm = router["warm_start"]
    assert warm["method"] == "previous" and warm["kept_rows"] == 5 and warm["added_rows"] == [5], warm


@pytest.mark.slow
def test_mostly_new_rows_fall_back_to_a_full_build_saying_why(
    data: dict[str, Any], previous: Path, tmp_path: Path
) -> None:
    rows = [r for s in data["skills"] for r in data["by"][s][4:40]]  # 36 per skill: half of them new, plus eval
    rows += [{**r, "prompt": r["prompt"] + " Please."} for r in data["by"][data["skills"][0]][4:22]]
    source = write_rows(tmp_path / "v4.jsonl", rows)
    cfg = _cfg(tmp_path, source, data["eval"], "build.incremental=auto", f"build.previous={previous}", "cluster.k=6")
    _build(cfg, until="cluster")
    plan = json.loads((tmp_path / "data/clusters/incremental.json").read_text())
    assert plan["mode"] == "full" and "build.max_new_fraction=0.5" in plan["reason"]
    assert json.loads((tmp_path / "data/clusters/report.json").read_text())["k_rule"] != "incremental"
    always = _cfg(tmp_path, source, data["eval"], "build.incremental=always", f"build.previous={previous}")
    from mole import stages

    with pytest.raises(ValueError, match="build.incremental=always: .* rows are new"):
        stages.cluster(always)


def test_build_from_and_full_contradict_each_other(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mole.cli import app

    res = CliRunner().invoke(app, ["build", "--preset", "tiny", "--from", str(tmp_path), "--full"])
    assert res.exit_code == 2 and "--from and --full" in res.output


def test_build_incremental_is_checked_naming_the_field() -> None:
    from mole.config import ConfigError

    with pytest.raises(ConfigError, match="build.incremental: value 'sometimes' is invalid"):
        load_config(None, overrides=["build.incremental=sometimes"])


def test_a_reused_experts_missing_timings_are_left_out_of_its_tracking_record(tmp_path: Path) -> None:
    """A reused expert was not trained in this build: its index entry has no seconds and no tokens/s (None). The
    registry's per-expert record leaves them out rather than failing the register step."""
    from flows.lineage import expert_records
    from mole.workspace import experts_paths

    cfg = load_config(None, preset="tiny", overrides=[f"workspace={tmp_path}"])
    adapter = tmp_path / "experts" / "expert_00"
    adapter.mkdir(parents=True)
    (adapter / "train_metrics.json").write_text(json.dumps({"final_loss": 2.5, "loss": [3.0, 2.5], "r": 8}))
    index = experts_paths(cfg)["index"]
    index.parent.mkdir(parents=True, exist_ok=True)
    entry = {"id": "expert_00", "cluster": 0, "path": "experts/expert_00", "seconds": None, "tokens_per_s": None,
             "reused": True}  # fmt: skip
    index.write_text(json.dumps({"experts": [entry]}))
    (record,) = expert_records(cfg)
    assert record["metrics"] == {"final_loss": 2.5} and record["params"]["reused"] == "True", record


def test_under_floor_counts_the_builds_in_a_row_each_expert_stayed_under_it() -> None:
    from mole.merge import plan
    from mole.sections import MergeConfig
    from mole.training.lifecycle import under_floor

    history = [{"utilization": {"a": 0.01, "b": 0.01, "c": 0.5}}, {"utilization": {"a": 0.01, "b": 0.3, "c": 0.01}},
               {"utilization": {"a": 0.01, "b": 0.01, "c": 0.01, "d": 0.97}}]  # fmt: skip
    streak = under_floor(history, ["a", "b", "c", "d"], 0.02)
    assert streak.tolist() == [3, 1, 2, 0]
    util, sim = np.array([0.01, 0.01, 0.01, 0.97]), np.eye(4)
    for after, pruned in ((1, ["a", "b", "c"]), (2, ["a", "c"]), (3, ["a"]), (4, [])):
        cfg = MergeConfig(utilization_floor=0.02, retire_after=after, similarity_ceiling=1.0)
        decisions = plan(util, sim, cfg, ids=["a", "b", "c", "d"], streak=streak)
        assert sorted(d["id"] for d in decisions if d["action"] == "prune") == pruned, after


def test_an_expert_under_the_floor_for_retire_after_builds_is_retired_and_the_lifecycle_says_so(
    data: dict[str, Any], previous: Path, tmp_path: Path
) -> None:
    """merge.retire_after = 2: the full build's merge-prune only records utilization (one build under the floor);
    the incremental build after it, where the experts are under the floor a second time, retires them (all but the
    most used: a floor of 0.5 holds every expert of six under it) and lifecycle.json says retired, after 2 builds."""
    import shutil

    from mole.merge import run_merge_prune
    from mole.training.lifecycle import lifecycle_report
    from mole.workspace import UTILIZATION_FILE

    merge = ["merge.utilization_floor=0.5", "merge.similarity_ceiling=1", "merge.tolerance=100", "merge.refit_steps=0"]
    first = tmp_path / "first"
    shutil.copytree(previous, first)
    cfg1 = _cfg(first, first / "data" / "v1.jsonl", data["eval"], "cluster.k=6", "merge.retire_after=2", *merge)
    shutil.copy(data["root"] / "v1.jsonl", cfg1.data.source)
    assert run_merge_prune(cfg1)["decisions"] == 0  # under the floor once: nothing retired yet
    history = json.loads((first / "artifacts" / "mole" / UTILIZATION_FILE).read_text())["history"]
    assert len(history) == 1 and len(history[0]["utilization"]) == 6

    for after, retired in ((3, 0), (2, 5)):
        ws = tmp_path / f"after{after}"
        cfg = _cfg(ws, data["root"] / "v1.jsonl", data["eval"], "build.incremental=always", f"build.previous={first}",
                   f"merge.retire_after={after}", *merge)  # fmt: skip
        _build(cfg)
        out = run_merge_prune(cfg)
        doc = lifecycle_report(cfg)
        gone = [e for e in doc["experts"] if e["status"] == "retired"]
        assert out["decisions"] == retired and len(gone) == retired, (after, out)
        assert all(e["builds_under_floor"] == 2 and e["trained_as"] == "reused" for e in gone), gone
        assert len(json.loads((ws / "artifacts" / "mole" / UTILIZATION_FILE).read_text())["history"]) == 2
