"""The MLflow model registry and its promotion gate (tracking in flows.tracking, the pyfunc in flows.packaging).

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
import time
from typing import Any

import mlflow
from mlflow import MlflowClient

from flows import comparison, lineage, live
from flows.packaging import load_pyfunc, log_model
from flows.promotion import Decision, decide
from flows.tracking import experiment_id, lineage_tags, log_build_run, run_name, tracking_to, wait_for_server
from mole.config import BuildConfig
from mole.eval.card import model_card
from mole.eval.evaluate import eval_inputs, evaluate_variant, variant_kwargs
from mole.eval.metrics import ModelScorer, mole_generator
from mole.nn.lineage import model_experts
from mole.workspace import eval_paths, mole_paths, prepared_paths

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


def register_build(
    cfg: BuildConfig,
    *,
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
    dvc_hashes: dict[str, str] | None = None,
    dvc_remote: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Log the build in ``cfg.workspace`` to MLflow and register its model; promote it if it beats the champion.

    Registering the same build again (same config hash, model files, prepared data and eval rows) returns the
    existing version with ``already_registered=True`` and logs nothing.

    Args:
        cfg: the build's configuration; its workspace holds the stages' outputs.
        flow_run_id: the Prefect flow run that built it (tag ``mole.flow_run_id``).
        flow_run_url: a link to that flow run in the Prefect UI (tag ``mole.flow_run_url``).
        dvc_hashes: {out path: md5} from flows.versioning.record_outputs, as lineage tags ``mole.dvc.<path>``.
        dvc_remote: the DVC remote those outs were pushed to (a link in the run's description).
        run_id: the build's parent run made when the flow started (flows.live), which already holds the live
            training curves: the build is logged into it. None (or a run no longer there) makes a new run.

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
    with tracking_to(uri):
        client, name = MlflowClient(uri, registry_uri=uri), cfg.tracking.model_name
        existing = _find_version(client, name, build["key"])
        if existing is not None:
            logger.info("build %s is already registered as %s version %s", build["key"], name, existing.version)
            if _live(client, run_id):
                live.discard_run(cfg, run_id)
            return _result(client, uri, existing, build, already=True)
        decision = decide(cfg, _champion(client, name), build, rescore=lambda v: _rescore(cfg, name, v))
        links = {"flow_run_id": flow_run_id, "flow_run_url": flow_run_url, "dvc_remote": dvc_remote}
        version = _log_and_register(cfg, client, build, decision, links, run_id if _live(client, run_id) else None)
    logger.info("registered %s version %s in %.1fs: %s", name, version.version, time.perf_counter() - t0,
                decision.reason)  # fmt: skip
    return _result(client, uri, version, build, already=False, decision=decision)


def _build_facts(cfg: BuildConfig, dvc_hashes: dict[str, str]) -> dict[str, Any]:
    """Everything the gate and the tags need, read from the workspace before anything is sent to MLflow."""

    model_dir = mole_paths(cfg)["dir"]
    report = lineage.read_json(eval_paths(cfg)["eval"], "evaluate")
    lineage.read_json(model_dir / "mole_config.json", "train-router")
    variant, metric = lineage.registered_variant(report), cfg.tracking.metric
    value = report["variants"][variant].get(metric)
    if not isinstance(value, int | float):
        raise ValueError(
            f"tracking.metric: {metric!r} of variant {variant!r} in {eval_paths(cfg)['eval']} "
            f"is {value!r}; expected one of {', '.join(lineage.METRIC_KEYS)} with a number"
        )
    facts = {
        "report": report, "variant": variant, "metric": metric, "value": float(value),
        "config_hash": cfg.section_hash(), "model_hash": lineage.content_hash(model_dir),
        "data_hash": lineage.content_hash(prepared_paths(cfg)["train"].parent),
        "eval_set_hash": lineage.eval_set_hash(cfg), "dvc": dict(sorted(dvc_hashes.items())), "model_dir": model_dir,
        "experts": model_experts(model_dir),
    }  # fmt: skip
    # The key ignores how the workspace path is spelled: the same build registered from elsewhere is the same.
    config_key = cfg.section_hash(*(n for n in BuildConfig.model_fields if n != "workspace"))
    keyed = [config_key, *(facts[k] for k in ("model_hash", "data_hash", "eval_set_hash"))]
    facts["key"] = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:16]
    return facts


def _live(client: MlflowClient, run_id: str | None) -> bool:
    """Whether ``run_id`` is a run of this tracking server that was not deleted."""
    if run_id is None:
        return False
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


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
    links: dict[str, str | None],
    run_id: str | None,
) -> Any:
    """Parent run (``run_id``, or a new one) + nested variant and expert runs + pyfunc model, then the version, its
    tags and aliases.

    A failure marks the run FAILED and deletes a version created on the way, so the registry gains nothing.
    """
    experiment = mlflow.set_experiment(experiment_id=experiment_id(client, cfg.tracking.experiment))
    flow_run_id, flow_run_url = links["flow_run_id"], comparison.valid_url(links["flow_run_url"])
    tags = lineage_tags(cfg, build, flow_run_id, flow_run_url)
    commit = None if tags["mole.git_commit"] == "none" else tags["mole.git_commit"]
    run_tags = (
        tags | lineage.lifecycle_tags(cfg) | comparison.run_tags(build, commit, flow_run_url, links["dvc_remote"])
    )
    version = None
    where = {"run_id": run_id} if run_id else {"experiment_id": experiment.experiment_id, "run_name": run_name(cfg)}
    with mlflow.start_run(**where, tags=run_tags) as run:
        try:
            mlflow.set_tags(run_tags)
            logged = live.expert_runs(client, run.info.run_id) if run_id else {}
            log_build_run(cfg, client, run.info.run_id, run.info.experiment_id, build, live_experts=logged)
            info = log_model(cfg, build)
            version_tags = tags | decision.tags() | {"mole.run_id": run.info.run_id}
            version_tags |= lineage.expert_tags(build["experts"])  # each expert's content hash (mole diff)
            version_tags |= lineage.lifecycle_tags(cfg)  # reused / updated / added since the previous build
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

    lineage_lines = {"MLflow run": run_id, "Prefect flow run": flow_run_url or flow_run_id,
                     **{f"DVC {path}": md5 for path, md5 in build["dvc"].items()}}  # fmt: skip
    card = model_card(cfg, build["report"], lineage=lineage_lines)
    if len(card) > DESCRIPTION_MAX:
        card = card[: DESCRIPTION_MAX - 40].rsplit("\n", 1)[0] + "\n\n(cut: README.md of the run holds all)\n"
    return card


def _rescore(cfg: BuildConfig, name: str, version: Any) -> float:
    """The champion's ``tracking.metric`` on this build's eval rows (its own eval set differed)."""

    model = load_pyfunc(f"models:/{name}/{version.version}").unwrap_python_model().model
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
