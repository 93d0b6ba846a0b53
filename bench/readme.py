"""The README's benchmark tables, written from the JSON under ``bench/results/`` (never copied by hand).

``python -m bench.readme`` rewrites every block between ``<!-- bench:NAME begin ... -->`` and
``<!-- bench:NAME end -->`` in README.md; ``--check`` exits 1 when the README differs from what the results give.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"


def _md(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def layer_block(results: Path) -> str:
    """MoLE / base forward on the demo shapes (``python -m bench.layer``), k=2 r=16."""
    rows = [r for r in _load(results / "layer.json")["rows"] if r["k"] == 2 and r["r"] == 16]
    cells = [[r["N"], r["k"], r["r"], r["ratio"], r["flop_floor"]] for r in rows]
    return _md(["N", "k", "r", "ratio", "FLOP floor"], cells)


def suite_block(results: Path) -> str:
    """The quick suite's headline, decode and forward tables, and the conditions they were measured in."""
    quick = results / "quick"
    summary, env = _load(quick / "summary.json"), _load(quick / "summary.json")["environment"]
    parts = [_md(["metric", "value", "goal", "met"], [[h["metric"], h["value"], h["goal"], h["met"]]
                                                       for h in summary["headline"]])]  # fmt: skip
    if (quick / "generate.json").exists():
        gen = _load(quick / "generate.json")
        batches = gen["batches"]
        by = {(r["variant"], r["batch"]): r for r in gen["rows"]}
        variants = list(dict.fromkeys(r["variant"] for r in gen["rows"]))
        cols = ["decode variant", *(f"batch {b} tokens/s" for b in batches), *(f"batch {b} vs base" for b in batches)]
        rows = [[v, *(by.get((v, b), {}).get("tokens_per_s") for b in batches),
                 *(by.get((v, b), {}).get("speed_vs_base") for b in batches)] for v in variants]  # fmt: skip
        parts.append(f"Decode: {gen['new_tokens']} greedy tokens, N={gen['N']} k={gen['k']} r={gen['r']}, median of "
                     f"{gen['reps']} interleaved rounds.\n\n" + _md(cols, rows))  # fmt: skip
    if (quick / "forward.json").exists():
        fwd = _load(quick / "forward.json")
        rows = [[r["variant"], r["N"], r["r"], r["ms"], r["ratio_to_base"], r["floor_model"]]
                for r in fwd["rows"] if "error" not in r]  # fmt: skip
        parts.append(f"Prefill of {fwd['batch']} × {fwd['tokens']} tokens, median of {fwd['reps']} interleaved "
                     "rounds:\n\n" + _md(["variant", "N", "r", "ms", "ratio to base", "FLOP floor"], rows))  # fmt: skip
    load = [f"{x[0]:.1f}" if x else "–" for x in (env.get("loadavg_start"), env.get("loadavg_end"))]
    share = env.get("cpu_share_during_run") or {}
    parts.append(
        f"Measured on {env.get('cores')} cores ({env.get('cpu')}, {env.get('device', 'cpu')}, "
        f"{env.get('gpu') or 'no GPU'}), torch {env.get('torch')}, {summary['wall_s']} s wall; load average "
        f"{load[0]} at the start and {load[1]} at the end"
        + (f", the machine {share['busy']:.0%} busy." if "busy" in share else ".")
    )
    return "\n\n".join(parts)


BLOCKS: dict[str, Callable[[Path], str]] = {"layer": layer_block, "suite": suite_block}


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every bench block rewritten from ``results``."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- bench:{name} begin[^>]*-->\n).*?(\n<!-- bench:{name} end -->)", re.DOTALL)
        if pattern.search(text):
            body = make(results)
            text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md's bench blocks (``--check``: only report whether they are current)."""
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is not what the results give")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md's benchmark tables differ from bench/results: run python -m bench.readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
