"""The model card: a Hugging Face style README.md of a built MoLE model, from the workspace's reports.

YAML front matter (``base_model``, ``library_name``, ``tags``, ``license``, and the eval numbers at full precision
under ``mole``), then what the experts are (each cluster's size, top terms and expert), the eval table with the
verdict against the baseline, routing, cost and lineage. The evaluate stage writes it as reports/model_card.md;
registration adds the MLflow run and Prefect flow run and sets it as the registered version's description.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from mole.base import DEMO_BASE, resolve_base
from mole.config import BuildConfig
from mole.io import sha256_file
from mole.workspace import cluster_paths, experts_paths, mole_paths, prepared_paths

LIBRARY = "peft"  # every expert is a peft LoRA adapter
TAGS = ["mole", "mixture-of-lora-experts", "lora", "peft"]
DEMO_HUB_ID, DEMO_LICENSE = "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"  # the demo base's origin


def base_facts(name: str) -> tuple[str, str]:
    """(``base_model`` as the Hub knows it where known, else the spec; its license, else ``"unknown"``)."""

    if name in (DEMO_BASE, "demo"):
        return DEMO_HUB_ID, DEMO_LICENSE
    try:
        rb = resolve_base(name)
    except (OSError, ValueError):
        return name, "unknown"
    readme = Path(rb.path) / "README.md" if rb.kind in ("dir", "gguf") else None
    if readme is not None and readme.is_file():  # a local HF dir's own card may carry its license
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                front = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                front = {}
            if isinstance(front, dict) and front.get("license"):
                return str(front.get("base_model") or name), str(front["license"])
    return name, "unknown"


def git_commit(directory: Path) -> str | None:
    """The git commit checked out at ``directory``, if it is in a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def model_card(cfg: BuildConfig, report: dict[str, Any], *, lineage: dict[str, Any] | None = None) -> str:
    """The card's text for the build in ``cfg.workspace`` evaluated as ``report`` (eval.json's content).

    Args:
        cfg: the build's config. report: eval.json as a dict.
        lineage: extra lineage lines (e.g. the MLflow run and Prefect flow run), name -> value.
    """

    spec = json.loads(mole_paths(cfg)["config"].read_text(encoding="utf-8"))
    creport = json.loads(cluster_paths(cfg)["report"].read_text(encoding="utf-8"))
    base_model, license_ = base_facts(cfg.base_model.name)
    variants, verdict = report["variants"], report.get("verdict") or {}
    front = {
        "base_model": base_model,
        "library_name": LIBRARY,
        "license": license_,
        "tags": TAGS,
        "mole": {
            "experts": len(spec["expert_ids"]),
            "top_k": spec["top_k"],
            "shared_expert": spec.get("shared") is not None,
            "beats_baseline": verdict.get("beats_baseline"),
            "eval": {n: {k: v.get(k) for k in ("loss", "ppl", "exact_match")} for n, v in variants.items()},
        },
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {cfg.tracking.model_name}", ""]
    lines += [f"A Mixture of LoRA Experts on `{cfg.base_model.name}`, built by mole: {len(spec['expert_ids'])} "
              f"experts routed top-{spec['top_k']} per token"
              + (", on top of a shared LoRA applied to every token." if spec.get("shared") else "."), ""]  # fmt: skip
    if verdict.get("headline"):
        lines += [f"**{verdict['headline']}**", ""]
    lines += ["## Experts", "", "| expert | cluster(s) | rows | top terms |", "|---|---|---:|---|"]
    sizes, terms = creport.get("sizes", []), creport.get("top_terms", {})
    for eid, served in zip(spec["expert_ids"], spec.get("clusters") or [], strict=False):
        cs = served if isinstance(served, list) else [served]
        rows = sum(sizes[c] for c in cs if c < len(sizes))
        top = ", ".join(t for c in cs for t in terms.get(str(c), [])[:6])
        lines.append(f"| {eid} | {', '.join(map(str, cs))} | {rows} | {top} |")
    lines += ["", "## Evaluation", "", "| variant | loss | ppl | exact match |", "|---|---:|---:|---:|"]
    for n, v in variants.items():
        cells = [_fmt(v.get("loss")), _fmt(v.get("ppl"), ".2f"), _fmt(v.get("exact_match"), ".3f")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    r, cost = report.get("routing") or {}, report.get("cost") or {}
    lines += ["", "## Routing and cost", "",
              f"- top-1 agreement of the token routers with the clusters: {_fmt(r.get('top1_agreement'), '.3f')}",
              *([f"- first token of each row routed by the first-token gate: agreement with the clusters "
                 f"{_fmt(r['first_gate_agreement'], '.3f')}"] if "first_gate_agreement" in r else []),
              f"- utilization: [{', '.join(f'{u:.3f}' for u in r.get('utilization', []))}]",
              f"- forward time ×{_fmt(cost.get('latency_ratio_vs_base'), '.2f')} of the base; "
              f"{_fmt(cost.get('adapter_mb'), '.1f')} MB of adapters"]  # fmt: skip
    prepared, index = prepared_paths(cfg), experts_paths(cfg)["index"]
    facts = {"git commit": git_commit(Path(__file__).parent), "train rows sha256": _digest(prepared["train"]),
             "eval rows sha256": _digest(prepared["eval"]), "experts.json sha256": _digest(index),
             "router sha256": _digest(mole_paths(cfg)["dir"] / "router.safetensors"), **(lineage or {})}  # fmt: skip
    lines += ["", "## Lineage", ""] + [f"- {k}: `{v}`" for k, v in facts.items() if v is not None]
    lines += ["", "Load it with `mole.nn.model.MoLEModel.from_pretrained(DIR)`, or from the registry with "
              f"`mlflow.pyfunc.load_model('models:/{cfg.tracking.model_name}@champion')`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _digest(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def front_matter(card: str) -> dict[str, Any]:
    """The YAML front matter of a card, parsed."""
    if not card.startswith("---\n"):
        raise ValueError("model card: no YAML front matter")
    return yaml.safe_load(card.split("---\n", 2)[1])
