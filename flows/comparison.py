"""What the MLflow UI shows to watch and compare a build: one run per eval variant, datasets, eval rows, links.

``log_variant_runs`` makes a nested run per variant of reports/eval.json, all with the same metric keys (``loss``,
``ppl``, ``exact_match`` and ``<metric>/cluster_<id>``), so the UI's chart and compare views put the variants
side by side. ``log_datasets`` logs the prepared train and eval splits as run inputs named by their content hash;
``log_eval_table`` the eval rows as a table; ``run_tags`` the git commit and the run's description with links.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from flows import lineage
from mole.config import BuildConfig
from mole.io import read_jsonl
from mole.workspace import cluster_paths, eval_paths, prepared_paths

VARIANT_TAG = "mole.variant_of_eval"  # on each variant's nested run: the eval.json variant it shows
KIND_TAG = "mole.child"  # "variant" or "expert": which kind of nested run
TABLE = "eval/rows.json"  # the eval rows table (mlflow.log_table) on the parent run


def variant_metrics(variant: dict[str, Any]) -> dict[str, float]:
    """One eval.json variant -> ``loss``, ``ppl``, ``exact_match`` and ``<metric>/cluster_<id>`` (None skipped)."""
    out = {k: float(variant[k]) for k in lineage.METRIC_KEYS if isinstance(variant.get(k), int | float)}
    for cid, c in (variant.get("per_cluster") or {}).items():
        out |= {f"{k}/cluster_{cid}": float(c[k]) for k in lineage.METRIC_KEYS if isinstance(c.get(k), int | float)}
    return out


def comparable_metrics(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{variant: metrics}, every variant with the same keys: one a variant lacks is NaN (MLflow shows no value)."""
    per = {name: variant_metrics(v) for name, v in report.get("variants", {}).items()}
    keys = sorted({k for m in per.values() for k in m})
    return {name: {k: m.get(k, math.nan) for k in keys} for name, m in per.items()}


def parent_metrics(report: dict[str, Any], variant: str) -> dict[str, float]:
    """The registered variant's metrics under the plain keys (runs of different builds compare), routing, cost."""
    out = comparable_metrics(report).get(variant, {})
    for section, keys in {
        "routing": ("top1_agreement", "entropy", "normalized_entropy"),
        "clustering": ("k", "silhouette", "ari"),
        "cost": ("trainable_params", "adapter_mb", "latency_ratio_vs_base"),
    }.items():
        values = report.get(section) or {}
        out |= {f"{section}.{k}": float(values[k]) for k in keys if isinstance(values.get(k), int | float)}
    return out


def log_variant_runs(client: MlflowClient, parent_id: str, experiment_id: str, build: dict[str, Any]) -> list[str]:
    """A nested run per eval variant (run name = variant), metrics at step 0, its training compute as params."""
    report, now, ids = build["report"], int(time.time() * 1000), []
    for name, metrics in comparable_metrics(report).items():
        tags = {"mlflow.parentRunId": parent_id, VARIANT_TAG: name, KIND_TAG: "variant",
                "mole.registered": str(name == build["variant"]).lower()}  # fmt: skip
        child = client.create_run(experiment_id, run_name=name, tags=tags)
        training = lineage.flatten((report.get("training") or {}).get(name) or {})
        client.log_batch(
            child.info.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            params=[Param(f"training.{k}", v) for k, v in training.items()],
        )
        client.set_terminated(child.info.run_id)
        ids.append(child.info.run_id)
    return ids


def log_datasets(cfg: BuildConfig) -> dict[str, str]:
    """The prepared train and eval splits as inputs of the active run (contexts training/evaluation).

    Each dataset is named ``<split>-<hash[:12]>`` and its digest is the file's content hash, so two runs on the
    same data show the same dataset. Returns {split: content hash}.
    """
    hashes = {}
    for split, context in (("train", "training"), ("eval", "evaluation")):
        path = prepared_paths(cfg)[split]
        digest = lineage.content_hash(path)
        df = pd.DataFrame(read_jsonl(path))
        name = f"{split}-{digest[:12]}"
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns it is ambiguous
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(df, source=str(path.resolve()), name=name, digest=digest)
        mlflow.log_input(dataset, context=context, tags={"mole.split": split, "mole.content_hash": digest})
        hashes[split] = digest
    return hashes


def eval_table(cfg: BuildConfig) -> pd.DataFrame:
    """One row per eval row: id, cluster, prompt (or text), reference completion, and each variant's loss on the
    row and greedy completion (``<variant>/loss``, ``<variant>/completion``, from reports/eval_rows.jsonl)."""
    rows = read_jsonl(prepared_paths(cfg)["eval"])
    assigned = cluster_paths(cfg)["eval_assignments"]
    cluster = {a["id"]: int(a["cluster"]) for a in read_jsonl(assigned)} if assigned.exists() else {}
    table = pd.DataFrame(
        {
            "id": [r.get("id") for r in rows],
            "cluster": [cluster.get(r.get("id"), -1) for r in rows],
            "prompt": [r.get("prompt", r.get("text", "")) for r in rows],
            "reference": [r.get("completion", "") for r in rows],
        }
    )
    per_row = eval_paths(cfg)["rows"]
    detail = read_jsonl(per_row) if per_row.exists() else []
    if len(detail) == len(table):
        for variant in [k for k in detail[0] if k != "id"] if detail else []:
            table[f"{variant}/loss"] = [d[variant]["loss"] for d in detail]
            table[f"{variant}/completion"] = [d[variant]["completion"] or "" for d in detail]
    return table


def log_eval_table(cfg: BuildConfig, run_id: str) -> None:
    mlflow.log_table(eval_table(cfg), TABLE, run_id=run_id)


def valid_url(url: str | None) -> str | None:
    """``url`` when it is a usable link; None for nothing, or a URL built from a missing part ("None")."""
    return url if url and "None" not in url and "://" in url else None


def run_tags(
    build: dict[str, Any], commit: str | None, flow_run_url: str | None, dvc_remote: str | None
) -> dict[str, str]:
    """Run-only tags: ``mlflow.source.git.commit`` (a git work tree only) and the description with links."""
    tags: dict[str, str] = {}
    if commit:
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    v = build["report"]["variants"][build["variant"]]
    lines = [
        f"MoLE build `{build['key']}`: registered variant **{build['variant']}**, "
        f"{build['metric']} {build['value']:.6g} (loss {v.get('loss')}, exact match {v.get('exact_match')}).",
        "",
        "Compare the variants in the nested runs tagged `mole.child = variant` (same metric keys in each).",
        "",
    ]
    if commit:
        lines.append(f"- git commit: `{commit}`")
    if url := valid_url(flow_run_url):
        lines.append(f"- Prefect flow run: [{url}]({url})")
    if dvc_remote and "None" not in dvc_remote:
        link = f"[{dvc_remote}]({dvc_remote})" if valid_url(dvc_remote) else f"`{dvc_remote}`"
        lines.append(f"- DVC remote: {link}")
    tags["mlflow.note.content"] = "\n".join(lines)
    return tags
