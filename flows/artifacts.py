"""What the Prefect UI shows of a build: table, markdown and link artifacts made from the stages' results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from mole.config import BuildConfig
from mole.workspace import eval_paths


def _key(config_name: str, what: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes; keyed artifacts keep their history across runs.
    safe = "".join(c if c.isalnum() else "-" for c in config_name.lower()).strip("-")
    return f"{safe}-{what}"[:100]


def clusters_table(clusters: dict[str, Any], *, name: str) -> None:
    """One row per cluster: size, eval rows, top terms and the majority domain when labels exist."""
    majority = clusters.get("majority_domain") or {}
    eval_sizes = clusters.get("eval_sizes") or [None] * clusters["k"]
    rows = [
        {
            "cluster": c,
            "train_rows": size,
            "eval_rows": eval_sizes[c],
            "top_terms": ", ".join(clusters.get("top_terms", {}).get(str(c), [])[:6]),
            "majority_domain": majority.get(str(c), majority.get(c)),
        }
        for c, size in enumerate(clusters["sizes"])
    ]
    desc = f"k = {clusters['k']} (silhouette {clusters['silhouette']}, ARI {clusters.get('ari')})"
    create_table_artifact(rows, key=_key(name, "clusters"), description=desc)


def experts_table(index: Path, *, name: str) -> None:
    """One row per trained adapter of experts.json: rows, steps, final loss, seconds, whether it was reused."""
    data = json.loads(index.read_text(encoding="utf-8"))
    entries = [*([data["shared"]] if data.get("shared") else []), *data["experts"],
               *([data["baseline"]] if data.get("baseline") else [])]  # fmt: skip
    keys = ("id", "cluster", "rows", "steps", "r", "final_loss", "seconds", "reused")
    rows = [{k: _round(e.get(k)) for k in keys} for e in entries]
    create_table_artifact(rows, key=_key(name, "experts"), description="per-expert training metrics")


def lifecycle_table(config: BuildConfig, *, name: str) -> None:
    """One row per adapter of reports/lifecycle.json: reused / updated / added (or trained in a full build), then
    retired or merged by merge-prune, rows, steps, loss before and after; the description says full or incremental,
    and why."""
    from mole.training.lifecycle import lifecycle_report

    doc = lifecycle_report(config)
    if doc is None:
        return
    keys = ("id", "status", "trained_as", "cluster", "rows", "new_rows", "steps", "loss_before", "loss_after")
    rows = [{k: _round(e.get(k)) for k in keys} | {"sha256": (e.get("sha256") or "")[:12]} for e in doc["experts"]]
    desc = f"{doc.get('mode')} build" + (f" from {doc['from']}" if doc.get("from") else "")
    desc += f": {doc['reason']}" if doc.get("reason") else ""
    create_table_artifact(rows, key=_key(name, "lifecycle"), description=desc)


def evaluation_table(path: Path, *, name: str) -> None:
    """One row per variant of eval.json (loss, ppl, exact match) plus routing and cost in the description."""
    report = json.loads(path.read_text(encoding="utf-8"))
    training = report.get("training") or {}
    rows = [
        {"variant": v, "loss": _round(m.get("loss")), "ppl": _round(m.get("ppl"), 2),
         "exact_match": _round(m.get("exact_match"), 3), "steps": training.get(v, {}).get("steps"),
         "training_tokens": training.get(v, {}).get("tokens"), "rank_per_token": training.get(v, {}).get("rank")}
        for v, m in report["variants"].items()
    ]  # fmt: skip
    routing, cost = report.get("routing", {}), report.get("cost", {})
    desc = (
        f"{(report.get('verdict') or {}).get('headline', '')} Router top-1 agreement "
        f"{_round(routing.get('top1_agreement'), 3)}, entropy {_round(routing.get('entropy'), 3)}; "
        f"{cost.get('trainable_params')} trainable params, latency ×{_round(cost.get('latency_ratio_vs_base'), 3)} "
        "of base"
    )
    create_table_artifact(rows, key=_key(name, "evaluation"), description=desc)


def _round(value: object, digits: int = 4) -> object:
    """Floats rounded for people to read (the JSON reports keep full precision)."""
    return round(value, digits) if isinstance(value, float) else value


def tracking_link(registered: dict[str, Any], *, name: str) -> None:
    """A link to the MLflow run (or, for a local sqlite store, how to open it)."""
    text = f"MLflow run {registered['run_id']}: {registered['model_name']} v{registered['version']}"
    if registered.get("run_url"):
        create_link_artifact(registered["run_url"], link_text=text, key=_key(name, "mlflow-run"))
    else:
        create_markdown_artifact(
            f"**{text}** ({registered['reason']})\n\nTracking URI `{registered['tracking_uri']}`: open it with "
            f"`mlflow ui --backend-store-uri {registered['tracking_uri']}`.",
            key=_key(name, "mlflow-run"),
        )


def summary_markdown(summary: dict[str, Any], *, name: str) -> None:
    """Where the build's outputs are."""
    lines = [f"- **{k}**: {shown(v)}" for k, v in summary.items() if v is not None]
    create_markdown_artifact("## mole build\n\n" + "\n".join(lines), key=_key(name, "summary"))


def shown(value: Any) -> str:
    """A summary value as people read it: floats to 4 significant digits, stage times as 'name 1.2 s'."""
    if isinstance(value, bool) or not isinstance(value, int | float | dict):
        return f"`{value}`"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.1f} s" if isinstance(v, int | float) else f"{k} {v}" for k, v in value.items())
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def report_paths(config: BuildConfig) -> dict[str, str]:
    """The report files a user opens after a build."""
    paths = eval_paths(config)
    return {"eval_json": str(paths["eval"]), "eval_md": str(paths["markdown"]), "merge": str(paths["merge_prune"])}
