"""MLflow tracking, registry and promotion gate against a real `mlflow server` on 127.0.0.1, on a tiny build.

One tiny workspace is built per module (stages called directly) and registered once; later tests add builds
(a worse one, a changed margin, a failing one) and end by stopping the server to check the unreachable case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flows import lineage, tracking
from flows.promotion import decide
from flows.registry import register_build
from flows.versioning import record_outputs
from mole import stages, workspace
from mole.config import BuildConfig, load_config
from mole.nn.model import MoLEModel
from tests.servers import free_port, stop, wait_http

# isort: split
# After flows: importing it turns MLflow's telemetry off (see flows/__init__.py) before mlflow is first imported.
import mlflow
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NAME = "mole-test"
OVERRIDES = [
    "data.demo_rows_per_skill=12",
    "cluster.embedder=tfidf",  # no sentence-transformer load
    "cluster.k=3",
    "experts.steps=6",
    "router.steps=2",
    "evaluate.generate_rows=6",
    "evaluate.max_new_tokens=6",
    "evaluate.latency_reps=1",
    f"tracking.model_name={NAME}",
    "tracking.retries=2",
    "tracking.require_beats_baseline=false",  # the gate's baseline rule has its own test; the tiny model is random
    "dvc.push=false",
]
GEN = {"max_new_tokens": 6}


def spawn(cmd: list[str], log: Path, **kwargs: Any) -> subprocess.Popen:
    """Start a server in its own session, its output in ``log`` (a pipe nobody reads would fill and block it)."""
    with log.open("w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


@dataclass
class Server:
    uri: str
    store: str  # the backend store, readable directly once the server is down
    proc: subprocess.Popen
    log: Path
    start_s: float | None = None

    def ready(self) -> Server:
        """Wait for /health once: the server starts while the module's workspace is built."""
        if self.start_s is None:
            t0 = time.perf_counter()
            wait_http(f"{self.uri}/health", proc=self.proc, log=self.log, timeout=180)
            self.start_s = time.perf_counter() - t0
            print(f"mlflow server answered {self.start_s:.1f}s after the first wait began")
        return self


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root, port = tmp_path_factory.mktemp("mlflow"), free_port()
    store = f"sqlite:///{root / 'mlflow.db'}"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", store, "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process for tests
    t0 = time.perf_counter()
    proc = spawn(cmd, root / "server.log", env=env)
    try:
        yield Server(f"http://127.0.0.1:{port}", store, proc, root / "server.log")
    finally:
        stop(proc)
        print(f"mlflow server ran {time.perf_counter() - t0:.1f}s")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, server: Server) -> BuildConfig:
    ws = tmp_path_factory.mktemp("reg_ws")
    cfg = load_config(None, preset="tiny", overrides=[f"workspace={ws}", f"tracking.uri={server.uri}", *OVERRIDES])
    for stage in (stages.prepare, stages.cluster, stages.train_experts, stages.train_router, stages.evaluate):
        stage(cfg)
    stages.merge_prune(cfg)
    return cfg


@pytest.fixture(scope="module")
def first(built: BuildConfig, server: Server) -> dict[str, Any]:
    versions = record_outputs(built)
    server.ready()
    t0 = time.perf_counter()
    res = register_build(
        built,
        flow_run_id="flow-run-1",
        flow_run_url="http://prefect.test/runs/1",
        dvc_hashes=versions["hashes"],
        dvc_remote=versions["remote"],
    )
    print(f"first registration: {time.perf_counter() - t0:.1f}s")
    return {**res, "dvc": versions["hashes"], "dvc_remote": versions["remote"]}


@pytest.fixture(scope="module")
def client(server: Server) -> MlflowClient:
    return MlflowClient(server.ready().uri, registry_uri=server.uri)


@pytest.fixture(scope="module")
def prompts(built: BuildConfig) -> list[str]:
    return [r["prompt"] for r in workspace.load_prepared(built)[1][:3]]


@pytest.fixture(scope="module")
def expected(built: BuildConfig, prompts: list[str]) -> list[str]:
    """Greedy completions of the workspace's MoLE model, loaded the plain way (base rebuilt from its seed)."""
    return MoLEModel.from_pretrained(workspace.mole_paths(built)["dir"]).generate_text(prompts, **GEN)


def _eval_value(cfg: BuildConfig) -> float:
    report = json.loads((cfg.path(cfg.evaluate.out_dir) / "eval.json").read_text())
    return report["variants"][lineage.registered_variant(report)]["loss"]


def _versions(client: MlflowClient) -> list[Any]:
    return client.search_model_versions(f"name = '{NAME}'")


# ------------------------------------------------------------------------------------ against the server
def test_first_build_logs_parent_and_nested_runs(first: dict, built: BuildConfig, client: MlflowClient) -> None:
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["experts.lora.r"] == "8" and run.data.params["base_model.name"] == "tiny"
    assert run.data.params["experts.lora.target_modules"] == '["q_proj", "v_proj"]'
    report = json.loads((built.path("reports") / "eval.json").read_text())
    registered = report["variants"][lineage.registered_variant(report)]
    assert run.data.metrics["loss"] == registered["loss"] and run.data.metrics["ppl"] == registered["ppl"]
    assert "routing.top1_agreement" in run.data.metrics
    assert not [k for k in run.data.metrics if k.split(".")[0] in report["variants"]], "variant-prefixed keys"
    tags = run.data.tags
    assert tags["mole.flow_run_id"] == "flow-run-1" and tags["mole.flow_run_url"] == "http://prefect.test/runs/1"
    assert tags["mole.config_hash"] == built.section_hash()
    assert tags["mole.dvc.data/prepared"] == first["dvc"]["data/prepared"] and tags["mole.dvc.data/prepared"]
    assert tags["mole.dvc.artifacts/experts"] == first["dvc"]["artifacts/experts"]
    assert tags["mole.git_commit"] == (lineage.git_commit(REPO) or "none")
    reports = {a.path for a in client.list_artifacts(first["run_id"], "reports")}
    expected = {
        "eval.json",
        "eval.md",
        "merge_prune.json",
        "loss_curves.png",
        "per_cluster_loss.png",
        "routing_heatmap.png",
        "variants.png",
        "cluster_map.png",
        "token_routing.png",
    }
    assert {f"reports/{n}" for n in expected} <= reports
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{first['run_id']}' and tags.`mole.child` = 'expert'"
    )
    index = json.loads((built.path("artifacts/experts/experts.json")).read_text())
    assert sorted(c.data.tags["mole.expert"] for c in children) == sorted(
        [e["id"] for e in index["experts"]] + [index["baseline"]["id"], index["shared"]["id"]]
    )
    for child in children:
        history = client.get_metric_history(child.info.run_id, "loss")
        steps = int(child.data.params["steps"])
        assert [m.step for m in history] == list(range(steps)), child.data.tags["mole.expert"]
        assert child.data.metrics["tokens_per_s"] > 0 and child.data.metrics["seconds"] > 0


# ------------------------------------------------------------------------- what the MLflow UI shows to compare
def test_each_eval_variant_is_a_nested_run_with_the_same_metric_keys(
    first: dict, built: BuildConfig, client: MlflowClient
) -> None:
    run = client.get_run(first["run_id"])
    report = json.loads((built.path("reports") / "eval.json").read_text())
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{first['run_id']}' and tags.`mole.child` = 'variant'"
    )
    by_name = {c.data.tags["mole.variant_of_eval"]: c for c in children}
    assert sorted(by_name) == sorted(report["variants"]) and len(by_name) >= 4
    assert all(c.info.run_name == n and c.info.status == "FINISHED" for n, c in by_name.items())
    keys = {n: set(c.data.metrics) for n, c in by_name.items()}
    assert len({frozenset(k) for k in keys.values()}) == 1, keys
    some = next(iter(keys.values()))
    clusters = report["variants"]["mole"]["per_cluster"]
    assert {"loss", "ppl", "exact_match"} | {f"loss/cluster_{c}" for c in clusters} <= some
    for name, child in by_name.items():
        v = report["variants"][name]
        assert child.data.metrics["loss"] == v["loss"]  # full precision, as eval.json has it
        for cid, c in v["per_cluster"].items():
            assert child.data.metrics[f"loss/cluster_{cid}"] == c["loss"]
        assert child.data.tags["mole.registered"] == str(name == lineage.registered_variant(report)).lower()
    assert by_name["multitask_lora"].data.params["training.steps"]


def test_parent_run_has_git_commit_description_datasets_and_eval_table(
    first: dict, built: BuildConfig, client: MlflowClient, tmp_path: Path
) -> None:
    run = client.get_run(first["run_id"])
    tags = run.data.tags
    commit = lineage.git_commit(built.workspace, REPO)
    assert commit, "precondition: the tests run from a git checkout"
    assert tags["mlflow.source.git.commit"] == commit.removesuffix("-dirty")
    note = tags["mlflow.note.content"]
    assert "http://prefect.test/runs/1" in note and first["dvc_remote"] in note and "None" not in note
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    paths = workspace.prepared_paths(built)
    for split, context in (("train", "training"), ("eval", "evaluation")):
        digest = lineage.content_hash(paths[split])
        d = inputs[f"{split}-{digest[:12]}"]
        assert d.dataset.digest == digest
        assert {t.key: t.value for t in d.tags}["mlflow.data.context"] == context
    assert inputs[f"eval-{lineage.content_hash(paths['eval'])[:12]}"].dataset.profile
    assert "eval/rows.json" in {a.path for a in client.list_artifacts(first["run_id"], "eval")}
    local = client.download_artifacts(first["run_id"], "eval/rows.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    rows = workspace.load_prepared(built)[1]
    assert table["columns"][:4] == ["id", "cluster", "prompt", "reference"] and len(table["data"]) == len(rows)
    assert [r[2] for r in table["data"]] == [r["prompt"] for r in rows]
    cols = table["columns"]
    assert {"mole/loss", "mole/completion", "multitask_lora/loss", "base/completion"} <= set(cols)
    per_row = [json.loads(line) for line in workspace.eval_paths(built)["rows"].read_text().splitlines()]
    assert [r[cols.index("mole/loss")] for r in table["data"]] == pytest.approx([d["mole"]["loss"] for d in per_row])
    report = json.loads(workspace.eval_paths(built)["eval"].read_text())
    assert "per_row" not in report["variants"]["mole"]  # per-row data lives in eval_rows.jsonl only


def test_first_build_is_champion_with_lineage_tags(first: dict, built: BuildConfig, client: MlflowClient) -> None:
    assert first["champion"] and not first["already_registered"]
    assert first["model_uri"] == f"models:/{NAME}/{first['version']}"
    experiment = client.get_run(first["run_id"]).info.experiment_id
    assert first["run_url"] == f"{built.tracking.uri}/#/experiments/{experiment}/runs/{first['run_id']}"
    v = client.get_model_version_by_alias(NAME, "champion")
    assert v.version == first["version"] and set(v.aliases) == {"champion", "challenger"}
    assert v.tags["mole.promotion.decision"] == "champion" and "no champion yet" in v.tags["mole.promotion.reason"]
    assert float(v.tags["mole.metric_value"]) == pytest.approx(_eval_value(built))
    assert v.tags["mole.eval_set_hash"] == lineage.eval_set_hash(built)
    assert v.tags["mole.config_hash"] == built.section_hash() and v.tags["mole.flow_run_id"] == "flow-run-1"
    assert v.tags["mole.dvc.data/prepared"] == first["dvc"]["data/prepared"]
    assert v.tags["mole.dvc.artifacts/mole/router.safetensors"] == first["dvc"]["artifacts/mole/router.safetensors"]


def test_the_model_card_is_the_versions_description(first: dict, built: BuildConfig, client: MlflowClient) -> None:
    from mole.eval.card import front_matter

    v = client.get_model_version(NAME, first["version"])
    front = front_matter(v.description)
    report = json.loads((built.path(built.evaluate.out_dir) / "eval.json").read_text())
    assert front["library_name"] == "peft" and front["base_model"] == built.base_model.name
    assert front["mole"]["eval"] == {n: {k: x.get(k) for k in ("loss", "ppl", "exact_match")}
                                     for n, x in report["variants"].items()}  # fmt: skip
    assert f"- MLflow run: `{first['run_id']}`" in v.description and "- Prefect flow run:" in v.description
    artifacts = {a.path for a in client.list_artifacts(first["run_id"])}
    assert "README.md" in artifacts


def test_same_build_twice_is_one_version(first: dict, built: BuildConfig, client: MlflowClient) -> None:
    again = register_build(built, flow_run_id="flow-run-2")
    assert again["already_registered"] and again["version"] == first["version"] and again["run_id"] == first["run_id"]
    key = client.get_model_version(NAME, first["version"]).tags["mole.build_key"]
    assert len(client.search_model_versions(f"name = '{NAME}' and tags.`mole.build_key` = '{key}'")) == 1


def test_registration_leaves_the_callers_mlflow_settings_alone(first: dict, built: BuildConfig) -> None:
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    uri = mlflow.get_tracking_uri()
    assert register_build(built)["already_registered"]
    assert {k: os.environ.get(k) for k in env} == env and mlflow.get_tracking_uri() == uri != built.tracking.uri


def test_champion_loads_in_a_fresh_process(
    first: dict, server: Server, tmp_path: Path, prompts: list, expected: list
) -> None:
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        f"out = m.predict(pd.DataFrame({{'prompt': {prompts!r}}}), params={GEN!r})\n"
        "print(json.dumps({'out': list(out), 'mole': sys.modules['mole'].__file__}))\n"
    )
    env = os.environ | {"MLFLOW_TRACKING_URI": server.uri}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["out"] == expected and all(isinstance(c, str) for c in got["out"])
    assert not got["mole"].startswith(str(REPO)), "the model must run on its bundled copy of the mole code"


def test_bundled_base_is_what_the_model_loads(
    first: dict, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prompts: list, expected: list
) -> None:
    with tracking.tracking_to(server.uri):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path)))
    info = json.loads((local / "artifacts" / "base" / "base.json").read_text())
    assert info["kind"] == "tiny" and info["source"]["seed"] == 0
    assert (local / "artifacts" / "base" / "model.safetensors").exists()
    requirements = (local / "requirements.txt").read_text().split()
    assert f"mlflow=={mlflow.__version__}" in requirements and any(r.startswith("torch==") for r in requirements)
    import mole.base
    from flows.pyfunc import load_mole

    monkeypatch.setattr(mole.base, "build_tiny", lambda **kw: pytest.fail("rebuilt the base instead of the bundle"))
    model = load_mole(local / "artifacts" / "mole", local / "artifacts" / "base")
    assert model.generate_text(prompts, **GEN) == expected


def test_worse_build_stays_challenger(first: dict, built: BuildConfig, client: MlflowClient, tmp_path: Path) -> None:
    ws = tmp_path / "worse"
    shutil.copytree(built.workspace, ws, ignore=shutil.ignore_patterns(".dvc", "dvc.lock", "baselines"))
    cheaper = ["experts.multitask_baseline=false", "evaluate.generate_rows=1"]  # the gate reads the loss only
    fewer = ["experts.steps=1", "experts.shared_steps=1"]
    worse = load_config(None, preset="tiny", overrides=[*_overrides(built, ws), *fewer, *cheaper])
    for stage in (stages.train_experts, stages.train_router, stages.evaluate, stages.merge_prune):
        stage(worse)
    assert _eval_value(worse) > _eval_value(built), "precondition: fewer expert steps give a worse eval loss"
    res = register_build(worse, flow_run_id="flow-run-worse")
    assert not res["champion"] and res["aliases"] == ["challenger"] and res["version"] != first["version"]
    v = client.get_model_version(NAME, res["version"])
    assert v.tags["mole.promotion.decision"] == "challenger" and "stays challenger" in v.tags["mole.promotion.reason"]
    assert float(v.tags["mole.promotion.champion_value"]) == pytest.approx(_eval_value(built))
    assert float(v.tags["mole.promotion.value"]) == pytest.approx(_eval_value(worse))
    assert float(v.tags["mole.promotion.improvement"]) < 0 and v.tags["mole.promotion.champion_source"] == "tag"
    assert client.get_model_version_by_alias(NAME, "champion").version == first["version"]


def test_gate_refuses_champion_to_a_build_that_loses_to_its_baseline(
    first: dict, built: BuildConfig, client: MlflowClient, tmp_path: Path
) -> None:
    """With tracking.require_beats_baseline on, a build whose mole loses to its own multitask_lora stays
    challenger, even though its loss beats the champion's, and says why in its tags."""
    from mole.eval.verdict import verdict

    ws = tmp_path / "loses"
    shutil.copytree(built.workspace, ws, ignore=shutil.ignore_patterns(".dvc", "dvc.lock"))
    # A much longer baseline (the experts are reused: their fingerprints leave multitask_steps out).
    overrides = [*_overrides(built, ws), "experts.multitask_steps=120", "tracking.require_beats_baseline=true",
                 "evaluate.generate_rows=1", "merge.utilization_floor=0"]  # fmt: skip
    loses = load_config(None, preset="tiny", overrides=overrides)
    assert stages.train_experts(loses)["trained"] == ["multitask_lora"]
    stages.evaluate(loses)
    report = json.loads((loses.path(loses.evaluate.out_dir) / "eval.json").read_text())
    v = verdict(report)
    assert v["beats_baseline"] is False, f"precondition: the longer baseline wins, got {v}"
    champion_value = float(client.get_model_version_by_alias(NAME, "champion").tags["mole.promotion.value"])
    res = register_build(loses, flow_run_id="flow-run-loses")
    tags = client.get_model_version(NAME, res["version"]).tags
    assert not res["champion"] and res["aliases"] == ["challenger"]
    assert tags["mole.promotion.beats_baseline"] == "false" and tags["mole.promotion.decision"] == "challenger"
    assert "does not beat its own baseline multitask_lora" in tags["mole.promotion.reason"]
    assert f"{v['loss']:.4f} vs {v['baseline_loss']:.4f}" in tags["mole.promotion.reason"]
    assert client.get_model_version_by_alias(NAME, "champion").version == first["version"]
    # Same model with the rule off: the ordinary comparison with the champion decides.
    off = loses.model_copy(update={"tracking": loses.tracking.model_copy(update={"require_beats_baseline": False})})
    d = decide(off, None, {"value": v["loss"], "eval_set_hash": "e", "report": report}, rescore=lambda _: 0.0)
    assert d.promote and d.beats_baseline is False and champion_value > 0


def test_champion_from_other_eval_rows_is_rescored(first: dict, built: BuildConfig, client: MlflowClient) -> None:
    """A champion tagged with another eval set is scored again on this build's rows: the same model, same value."""
    true_hash = client.get_model_version(NAME, first["version"]).tags["mole.eval_set_hash"]
    client.set_model_version_tag(NAME, first["version"], "mole.eval_set_hash", "another-eval-set")
    try:
        margin = built.model_copy(update={"tracking": built.tracking.model_copy(update={"promotion_margin": 0.5})})
        res = register_build(margin)
    finally:
        client.set_model_version_tag(NAME, first["version"], "mole.eval_set_hash", true_hash)
    v = client.get_model_version(NAME, res["version"])
    assert not res["champion"] and v.tags["mole.promotion.champion_source"] == "rescored"
    assert float(v.tags["mole.promotion.champion_value"]) == pytest.approx(_eval_value(built), rel=1e-5)
    assert "re-scored" in res["reason"] and "margin 50.000%" in res["reason"]


def test_failure_after_registering_leaves_no_version(
    first: dict, built: BuildConfig, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {v.version for v in _versions(client)}

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("alias service down")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", boom)
    failing = built.model_copy(update={"seed": 1})  # another config hash: a new build
    with pytest.raises(RuntimeError, match="alias service down"):
        register_build(failing)
    monkeypatch.undo()
    assert {v.version for v in _versions(client)} == before
    runs = client.search_runs(
        [client.get_experiment_by_name(built.tracking.experiment).experiment_id],
        f"tags.`mole.config_hash` = '{failing.section_hash()}'",
    )
    assert [r.info.status for r in runs] == ["FAILED"]


def test_mole_predict_and_register_commands(
    first: dict, built: BuildConfig, prompts: list, expected: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from mole.cli import app

    monkeypatch.chdir(built.workspace)  # its params.yaml (written by record_outputs) is the config
    monkeypatch.setenv("COLUMNS", "200")
    args = ["predict", "--json", "--max-new-tokens", "6", "--model", f"models:/{NAME}@champion"]
    res = CliRunner().invoke(app, [*args, *(a for p in prompts for a in ("--prompt", p))])
    assert res.exit_code == 0, res.output
    assert [r["completion"] for r in json.loads(res.stdout)] == expected
    model_dir = str(workspace.mole_paths(built)["dir"])
    res = CliRunner().invoke(app, ["predict", "--max-new-tokens", "6", "--model", model_dir, "--prompt", prompts[0]])
    assert res.exit_code == 0 and res.stdout == expected[0] + "\n"
    res = CliRunner().invoke(app, ["register"])
    assert res.exit_code == 0, res.output
    assert f"models:/{NAME}/{first['version']}" in res.stdout and "already registered │ true" in res.stdout


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(first: dict, server: Server, tmp_path: Path, prompts, expected):
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{NAME}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # The scoring server is `uvicorn` from the environment's bin: on PATH, as in an activated venv.
    env = os.environ | {"MLFLOW_TRACKING_URI": server.uri, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "serve.log"
    proc = spawn(cmd, log, cwd=tmp_path, env=env)
    try:
        t0 = time.perf_counter()
        wait_http(f"http://127.0.0.1:{port}/ping", proc=proc, log=log, timeout=240)
        print(f"mlflow models serve ready in {time.perf_counter() - t0:.1f}s")
        body = json.dumps({"dataframe_records": [{"prompt": p} for p in prompts], "params": GEN}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["predictions"] == expected
    finally:
        stop(proc)


def test_server_down_fails_clearly_and_registers_nothing(
    first: dict, built: BuildConfig, server: Server, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs last: it stops the module's server."""
    before = {str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")}
    stop(server.proc)
    monkeypatch.setattr(tracking, "BACKOFF_S", 0.05)
    down = built.model_copy(update={"seed": 2})
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"{server.uri}.*unreachable after 2 attempts"):
        register_build(down)
    assert time.perf_counter() - t0 < 30
    store = MlflowClient(server.store, registry_uri=server.store)  # the server's own database, read directly
    assert not store.search_model_versions(f"name = '{NAME}' and tags.`mole.config_hash` = '{down.section_hash()}'")
    assert {str(v.version) for v in store.search_model_versions(f"name = '{NAME}'")} == before


def _overrides(cfg: BuildConfig, ws: Path) -> list[str]:
    return [f"workspace={ws}", f"tracking.uri={cfg.tracking.uri}", *OVERRIDES]
