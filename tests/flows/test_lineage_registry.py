"""Expert lineage in the registry, against a real `mlflow server` on 127.0.0.1: each version's expert hashes as tags,
and ``mole diff models:/m/1 models:/m/2`` between a tiny build (version 1) and its forced merge (version 2).

The merge keeps the unmerged experts byte for byte (the router re-fit freezes them), so version 2 has one expert
added (the merge), two removed (its parents), and the rest unchanged: every status of ``mole diff`` but "changed",
which tests/test_diff.py covers on model dirs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.lineage import EXPERT_TAG, EXPERTS_TAG
from flows.registry import register_build
from flows.versions import download_version, has_alias
from mole import stages, workspace
from mole.cli import app
from mole.config import BuildConfig, load_config
from mole.data.demo import generate_demo_corpus
from mole.eval.verdict import verdict
from mole.io import write_jsonl
from mole.nn.lineage import adapter_digest, brief, compare, model_experts
from mole.stages.incremental import model_dir_of, stage_previous
from tests.servers import free_port, mlflow_server

# isort: split
# After flows: importing it turns MLflow's telemetry off (see flows/__init__.py) before mlflow is first imported.
from mlflow import MlflowClient

BIN = Path(sys.executable).parent
NAME = "mole-lineage"
OVERRIDES = [
    "data.demo_rows_per_skill=12",
    "cluster.embedder=tfidf",
    "cluster.k=3",
    "experts.steps=6",
    "router.steps=2",
    "evaluate.generate_rows=2",
    "evaluate.max_new_tokens=4",
    "evaluate.latency_reps=1",
    f"tracking.model_name={NAME}",
    "tracking.require_beats_baseline=false",
    "merge.utilization_floor=0",  # no pruning: the most similar pair merges whatever its similarity ...
    "merge.similarity_ceiling=-1",
    "merge.tolerance=100",  # ... and is accepted
    "merge.refit_steps=1",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), BIN) as uri:
        yield uri


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, server: str) -> dict[str, Any]:
    """Version 1: the tiny build as train-router made it; version 2: after an accepted merge-prune."""
    ws = tmp_path_factory.mktemp("lineage_ws")
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={ws}", f"tracking.uri={server}", *OVERRIDES])
    for stage in (stages.prepare, stages.cluster, stages.train_experts, stages.train_router, stages.evaluate):
        stage(cfg)
    v1 = register_build(cfg)
    merged = stages.merge_prune(cfg)
    assert merged["accepted"] and merged["experts_after"] == 2, f"precondition: one pair merges, got {merged}"
    v2 = register_build(cfg)
    return {"cfg": cfg, "v1": v1, "v2": v2}


def _diff(server: str, *args: str) -> Any:
    env = {"COLUMNS": "220", "NO_COLOR": "1"}
    return CliRunner().invoke(app, ["diff", *args, "--set", f"tracking.uri={server}"], env=env, terminal_width=220)


def test_each_expert_records_the_build_and_the_trained_adapter_it_came_from(built: dict) -> None:
    cfg: BuildConfig = built["cfg"]
    unmerged = model_experts(cfg.path(cfg.merge.keep_dir))  # what train-router wrote (version 1)
    index = json.loads(workspace.experts_paths(cfg)["index"].read_text())
    entries = {e["id"]: e for e in [*index["experts"], index["shared"]]}
    assert set(unmerged) == set(entries) and len(unmerged) == 4  # 3 experts + the shared one (cotrained)
    config_hash = cfg.section_hash(*(n for n in BuildConfig.model_fields if n != "workspace"))
    for eid, record in unmerged.items():
        (parent,) = record["parents"]
        assert parent["sha256"] == adapter_digest(cfg.path(entries[eid]["path"])) and parent["id"] == eid
        assert parent["fingerprint"] == entries[eid]["fingerprint"]
        e = entries[eid]
        assert (record["rows"], record["steps"], record["joint_steps"]) == (e["rows"], e["steps"], 2)
        assert record["made_by"]["stage"] == "train-router" and record["made_by"]["config_hash"] == config_hash
        assert "recorded_sha256" not in record
        # the joint phase trained the experts: the model's expert is not its parent adapter
        assert record["sha256"] != parent["sha256"]


def test_a_version_tags_its_experts_hashes_and_one_query_finds_the_versions_with_an_expert(
    built: dict, server: str
) -> None:
    cfg: BuildConfig = built["cfg"]
    client = MlflowClient(server, registry_uri=server)
    v2 = client.get_model_version(NAME, built["v2"]["version"])
    records = model_experts(workspace.mole_paths(cfg)["dir"])
    assert json.loads(v2.tags[EXPERTS_TAG]) == {eid: brief(r) for eid, r in records.items()}
    merged = next(e for e in records if "+" in e)
    assert v2.tags[EXPERT_TAG + merged.replace("+", "-")] == records[merged]["sha256"]
    assert records[merged]["made_by"]["stage"] == "merge-prune" and len(records[merged]["parents"]) == 2
    kept = next(e for e in records if e.startswith("expert_") and "+" not in e)
    found = client.search_model_versions(f"name = '{NAME}' and tags.`{EXPERT_TAG}{kept}` = '{records[kept]['sha256']}'")
    assert sorted(v.version for v in found) == sorted([built["v1"]["version"], built["v2"]["version"]])


def test_mole_diff_of_two_versions_is_the_diff_of_their_model_dirs(built: dict, server: str) -> None:
    cfg: BuildConfig = built["cfg"]
    v1, v2 = (f"models:/{NAME}/{built[v]['version']}" for v in ("v1", "v2"))
    res = _diff(server, v1, v2, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    dirs = [cfg.path(cfg.merge.keep_dir), workspace.mole_paths(cfg)["dir"]]
    local = compare(*({e: brief(r) for e, r in model_experts(d).items()} for d in dirs))
    assert doc["experts"] == local
    assert doc["counts"] == {"changed": 0, "added": 1, "removed": 2, "unchanged": 2}
    assert doc["old"]["label"] == f"{NAME} version {built['v1']['version']}"
    # An alias, and a registered version against a model dir, give the same answer.
    mixed = _diff(server, str(dirs[0]), f"models:/{NAME}@challenger", "--json")
    assert mixed.exit_code == 0, mixed.output
    assert json.loads(mixed.stdout)["experts"] == local
    table = _diff(server, v1, v2)
    assert table.exit_code == 0 and "0 changed, 1 added, 2 removed, 2 unchanged" in table.stdout
    merged = next(r for r in local if r["status"] == "added")
    assert f"merge of {' + '.join(p['id'] for p in merged['new']['parents'])}" in table.stdout


@pytest.mark.parametrize(
    ("ref", "message", "code"),
    [
        ("models:/{name}/99", "NEW models:/{name}/99: model '{name}' has no version 99 (versions: 1, 2)", 2),
        ("models:/nope/1", "NEW models:/nope/1: no registered model 'nope' at {uri}", 2),
        (
            "models:/{name}@nope",
            "NEW models:/{name}@nope: model '{name}' has no alias 'nope' (aliases: challenger, champion)",
            2,
        ),  # fmt: skip
    ],
)
def test_a_version_that_is_not_there_is_named(built: dict, server: str, ref: str, message: str, code: int) -> None:
    res = _diff(server, f"models:/{NAME}/1", ref.format(name=NAME))
    assert res.exit_code == code, res.output
    assert message.format(name=NAME, uri=server) in " ".join(res.stderr.split())


def test_a_registered_version_can_be_the_previous_build_of_an_incremental_one(
    built: dict[str, Any], server: str, tmp_path: Path
) -> None:
    cfg, version = built["cfg"], built["v1"]["version"]
    tags = MlflowClient(server, registry_uri=server).get_model_version(NAME, version).tags
    assert tags["mole.build_mode"] == "full" and json.loads(tags["mole.lifecycle"])["reason"]
    assert has_alias(NAME, "challenger", uri=server) and not has_alias(NAME, "nope", uri=server)
    ref = f"models:/{NAME}/{version}"
    label, local = download_version(ref, uri=server, dest=tmp_path / "download")
    assert label == f"{NAME} version {version}"
    staged = stage_previous(cfg.model_copy(update={"workspace": str(tmp_path / "ws")}), model_dir_of(local), ref)
    assert (staged / "clusterer" / "assignments.jsonl").is_file() and (staged / "experts" / "expert_00").is_dir()
    assert json.loads((staged / "source.json").read_text())["ref"] == ref


@pytest.mark.e2e
def test_the_gate_refuses_an_incremental_build_that_loses_to_its_baseline(
    built: dict[str, Any], server: str, tmp_path: Path
) -> None:
    """An incremental build from a registered version meets the promotion gate as a full build does: it is compared
    with the champion on the same eval rows, and with tracking.require_beats_baseline on, a build whose mole loses
    to its own multitask_lora stays challenger, saying why."""
    cfg = built["cfg"]
    train, evals = workspace.load_prepared(cfg)
    skill = train[0]["domain"]
    extra = [r for r in generate_demo_corpus(rows_per_skill=40, seed=7) if r["domain"] == skill]
    known = {(r["prompt"], r["completion"]) for r in [*train, *evals]}
    extra = [r for r in extra if (r["prompt"], r["completion"]) not in known][:3]
    source, eval_source = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(source, [*train, *extra])
    write_jsonl(eval_source, evals)
    ref = f"models:/{NAME}/{built['v1']['version']}"
    overrides = [f"workspace={tmp_path / 'ws'}", f"tracking.uri={server}", *OVERRIDES, f"data.source={source}",
                 f"data.eval_source={eval_source}", "build.incremental=always", f"build.previous={ref}",
                 "experts.multitask_steps=120", "tracking.require_beats_baseline=true"]  # fmt: skip
    inc = load_config(None, preset="tiny", overrides=overrides)
    _, local = download_version(ref, uri=server, dest=tmp_path / "download")
    stage_previous(inc, model_dir_of(local), ref)  # what the build flow's fetch-previous task does
    for stage in (stages.prepare, stages.cluster, stages.train_experts, stages.train_router, stages.evaluate):
        stage(inc)
    lifecycle = json.loads((inc.path("reports") / "lifecycle.json").read_text())
    assert lifecycle["mode"] == "incremental" and lifecycle["new_rows"] == 3, lifecycle
    assert {e["status"] for e in lifecycle["experts"]} >= {"reused", "updated"}, lifecycle["experts"]
    v = verdict(json.loads((inc.path(inc.evaluate.out_dir) / "eval.json").read_text()))
    assert v["beats_baseline"] is False, f"precondition: the longer baseline wins, got {v}"
    client = MlflowClient(server, registry_uri=server)
    champion = client.get_model_version_by_alias(NAME, "champion")
    res = register_build(inc, flow_run_id="flow-run-incremental-loses")
    tags = client.get_model_version(NAME, res["version"]).tags
    assert tags["mole.build_mode"] == "incremental" and not res["champion"] and res["aliases"] == ["challenger"]
    assert tags["mole.promotion.beats_baseline"] == "false" and tags["mole.promotion.decision"] == "challenger"
    assert "does not beat its own baseline multitask_lora" in tags["mole.promotion.reason"]
    # Compared with the champion on the same rows: the champion's value as it was tagged on this eval set.
    assert tags["mole.promotion.champion_version"] == champion.version
    assert tags["mole.promotion.champion_source"] == "tag"
    assert float(tags["mole.promotion.champion_value"]) == pytest.approx(float(champion.tags["mole.promotion.value"]))
    assert client.get_model_version_by_alias(NAME, "champion").version == champion.version


def test_an_unreachable_tracking_server_is_named(built: dict) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    res = _diff(down, f"models:/{NAME}/1", str(workspace.mole_paths(built["cfg"])["dir"]))
    assert res.exit_code == 1, res.output
    assert f"OLD MLflow tracking server {down} is unreachable after 1 attempts" in " ".join(res.stderr.split())
