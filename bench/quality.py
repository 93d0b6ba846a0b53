"""Quality benchmark: does the mixture beat one LoRA trained on all the data, with the same training compute?

Runs the build's stages (prepare, cluster with automatic k, train-experts, train-router, evaluate, merge-prune) in a
fresh workspace per corpus, on the demo preset's base model, and prints per corpus: the k chosen, its ARI against
the ``domain`` column, the loss (and exact match) of every variant, mole / multitask_lora, the verdict, and the wall
time of every stage. Results go to ``bench/results/quality/<corpus>.json``. Not part of ``make test``.

    python -m bench.quality                          # the demo corpus and realdev
    python -m bench.quality --corpus realdev --data DIR   # DIR holds train.jsonl and eval.jsonl
    python -m bench.quality --set experts.shared=none     # any config override, applied to every corpus

Corpora: ``demo`` (the embedded default, ``--preset demo``) and ``realdev`` (``../shared/corpora/realdev`` beside
the repository, or ``--data``): real text in several domains, with the same config as the demo preset.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, console, environment, table, write_result

REALDEV = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "realdev"
STAGES = ("prepare", "cluster", "train_experts", "train_router", "evaluate", "merge_prune")


def corpus_overrides(corpus: str, data: Path | None) -> list[str]:
    """The ``--set`` overrides that point the demo preset at a corpus."""
    if corpus == "demo":
        return []
    root = data or REALDEV
    for name in ("train.jsonl", "eval.jsonl"):
        if not (root / name).is_file():
            raise SystemExit(f"{corpus}: {root / name} does not exist; pass --data DIR with train.jsonl and eval.jsonl")
    return [f"data.source={root / 'train.jsonl'}", f"data.eval_source={root / 'eval.jsonl'}"]


def run_corpus(corpus: str, overrides: list[str], workspace: Path) -> dict[str, Any]:
    """Every stage of the build in ``workspace``; returns the numbers of the quality table."""
    from mole import stages
    from mole.config import load_config

    cfg = load_config(None, preset="demo", overrides=[f"workspace={workspace}", *overrides])
    seconds: dict[str, float] = {}
    for name in STAGES:
        t0 = time.perf_counter()
        console.print(f"[bold]{corpus}[/]: {name} …")
        getattr(stages, name)(cfg)
        seconds[name] = round(time.perf_counter() - t0, 1)
    report = json.loads((cfg.path(cfg.evaluate.out_dir) / "eval.json").read_text(encoding="utf-8"))
    clusters = json.loads((cfg.path(cfg.cluster.out_dir) / "report.json").read_text(encoding="utf-8"))
    v = report["verdict"]
    return {
        "corpus": corpus,
        "overrides": overrides,
        "k": clusters["k"],
        "k_rule": clusters.get("k_rule"),
        "ari": clusters.get("ari"),
        "variants": {n: {k: x.get(k) for k in ("loss", "exact_match")} for n, x in report["variants"].items()},
        "training": report.get("training"),
        "verdict": v,
        "mole_over_multitask": None if v.get("baseline_loss") is None else v["loss"] / v["baseline_loss"],
        "seconds": seconds,
        "config": cfg.model_dump(mode="json"),
    }


def show(result: dict[str, Any]) -> None:
    """Print one corpus's tables."""
    c = result["corpus"]
    training = result.get("training") or {}
    rows = []
    for n, x in result["variants"].items():
        t = training.get(n, {})
        rows.append({"variant": n, "loss": _digits(x["loss"], 4), "exact match": _digits(x["exact_match"], 3),
                     "steps": t.get("steps"), "tokens": t.get("tokens"), "rank/token": t.get("rank")})  # fmt: skip
    table(f"{c}: k = {result['k']} ({result['k_rule']}), ARI {result['ari']}", list(rows[0]), rows)
    ratio = result["mole_over_multitask"]
    console.print(f"{c}: {result['verdict']['variant']} / {result['verdict']['baseline']} = "
                  f"{'-' if ratio is None else f'{ratio:.4f}'}", highlight=False)  # fmt: skip
    console.print(result["verdict"]["headline"], highlight=False, markup=False)
    table(f"{c}: wall time per stage (s)", list(STAGES), [{k: _digits(v, 1) for k, v in result["seconds"].items()}])


def _digits(v: float | None, n: int) -> str | None:
    """``v`` with ``n`` decimals for the tables (losses to 4, exact match to 3, seconds to 1); None stays None."""
    return None if v is None else f"{v:.{n}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", action="append", choices=("demo", "realdev"), help="default: both")
    parser.add_argument("--data", type=Path, help="directory with train.jsonl and eval.jsonl for realdev")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    parser.add_argument("--keep", type=Path, help="build in this directory (kept) instead of a temporary one")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality", help="where the JSON results go")
    args = parser.parse_args(argv)
    results = []
    for corpus in args.corpus or ["demo", "realdev"]:
        overrides = corpus_overrides(corpus, args.data) + args.overrides
        with tempfile.TemporaryDirectory(prefix=f"mole-quality-{corpus}-") as tmp:
            ws = (args.keep / corpus) if args.keep else Path(tmp)
            ws.mkdir(parents=True, exist_ok=True)
            result = run_corpus(corpus, overrides, ws) | {"environment": environment()}
        show(result)
        write_result(corpus, "", result, out_dir=args.out)
        results.append(result)
    lost = [r["corpus"] for r in results if r["verdict"]["beats_baseline"] is False]
    if lost:
        console.print(f"the mixture does NOT beat its baseline on: {', '.join(lost)}", style="bold red")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
