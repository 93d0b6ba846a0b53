"""Reading what a registered model version records about its experts (the ``mole.experts`` tag), for ``mole diff``.

``models:/<name>/<version>`` and ``models:/<name>@<alias>`` are resolved against the tracking server; a model,
version or alias that is not there is a ``LookupError`` naming it and what is there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from flows.lineage import EXPERTS_TAG
from flows.tracking import tracking_to, wait_for_server

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


def parse_model_uri(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` -> (name, version, None); ``models:/<name>@<alias>`` -> (name, None, alias).

    Raises:
        ValueError: ``ref`` has another form (naming it and the forms expected).
    """
    m = MODEL_URI.match(ref)
    if m is None or (m["version"] is not None and not m["version"].isdigit()):
        raise ValueError(f"{ref!r}: expected models:/<name>/<version number> or models:/<name>@<alias>")
    return m["name"], m["version"], m["alias"]


def version_experts(ref: str, *, uri: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The registered version ``ref`` (``models:/…``) as ("<name> version <n>", expert id -> record) from its tags.

    Raises:
        LookupError: no such model, version or alias at ``uri``; or a version registered before mole recorded its
            experts (no ``mole.experts`` tag).
        ValueError: ``ref`` is not a ``models:/`` URI of a version or alias.
        RuntimeError: the tracking server at ``uri`` does not answer (or answers with another error), naming it.
    """
    name, version, alias = parse_model_uri(ref)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():  # MLflow would create it
        raise LookupError(f"{ref}: no tracking store at {uri} (no such file); set tracking.uri or MLFLOW_TRACKING_URI")
    wait_for_server(uri, attempts=1)
    with tracking_to(uri):
        client = MlflowClient(uri, registry_uri=uri)
        mv = _resolve(client, ref, name, version, alias)
    label = f"{name} version {mv.version}" + (f" (@{alias})" if alias else "")
    raw = mv.tags.get(EXPERTS_TAG)
    if raw is None:
        raise LookupError(
            f"{ref}: {label} has no {EXPERTS_TAG} tag (registered before mole recorded its experts' hashes); "
            "download both models' artifacts/mole and diff the directories"
        )
    try:
        table = json.loads(raw)
    except ValueError:
        raise LookupError(f"{ref}: the {EXPERTS_TAG} tag of {label} is not JSON: {raw[:80]!r}") from None
    return label, {eid: {"id": eid, **record} for eid, record in table.items()}


def _resolve(client: MlflowClient, ref: str, name: str, version: str | None, alias: str | None) -> Any:
    """The model version ``ref`` names, or a LookupError saying what is missing and what exists."""
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        _unless_missing(exc, ref, client)
        raise LookupError(f"{ref}: no registered model {name!r} at {client.tracking_uri}") from None
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as exc:
        _unless_missing(exc, ref, client)
        if alias:
            have = ", ".join(sorted(model.aliases)) or "none"
            raise LookupError(f"{ref}: model {name!r} has no alias {alias!r} (aliases: {have})") from None
        have = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise LookupError(f"{ref}: model {name!r} has no version {version} (versions: "
                          f"{', '.join(map(str, have)) or 'none'})") from None  # fmt: skip


def _unless_missing(exc: Exception, ref: str, client: MlflowClient) -> None:
    """Re-raise an MLflow error other than "does not exist" as a RuntimeError naming ``ref`` and the server."""
    if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        raise RuntimeError(f"{ref}: the tracking server {client.tracking_uri} failed: {exc}") from None


def download_version(ref: str, *, uri: str, dest: Path) -> tuple[str, Path]:
    """Download the registered version ``ref`` (``models:/…``) into ``dest``; returns its label and the local dir.

    Raises:
        LookupError, ValueError, RuntimeError: as :func:`version_experts`.
    """
    name, version, alias = parse_model_uri(ref)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise LookupError(f"{ref}: no tracking store at {uri} (no such file); set tracking.uri or MLFLOW_TRACKING_URI")
    wait_for_server(uri, attempts=1)
    with tracking_to(uri):
        client = MlflowClient(uri, registry_uri=uri)
        mv = _resolve(client, ref, name, version, alias)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dest))
    return f"{name} version {mv.version}", Path(local)


def has_alias(name: str, alias: str, *, uri: str) -> bool:
    """Whether registered model ``name`` has ``alias`` at ``uri`` (False when there is no store or model yet)."""
    try:
        version_label = _resolve_alias(name, alias, uri=uri)
    except (LookupError, RuntimeError):
        return False
    return version_label is not None


def _resolve_alias(name: str, alias: str, *, uri: str) -> str | None:
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    wait_for_server(uri, attempts=1)
    with tracking_to(uri):
        client = MlflowClient(uri, registry_uri=uri)
        return _resolve(client, f"models:/{name}@{alias}", name, None, alias).version
