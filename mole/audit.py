"""``mole explain``, the routing audit: the command, and its views (tokens coloured by their top expert in the
terminal, an HTML page, a PNG heatmap). Part of the app layer with :mod:`mole.cli`, which registers the command; the
audit itself is :mod:`mole.routing.explain`.

Every view shows each token's mean routing weight per expert over the blocks; the per-block view, each block's.
Weights are shown to 3 decimals; ``--json`` keeps full precision.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from mole.config import BuildConfig
from mole.console import (
    ConfigOpt,
    ModelOpt,
    PresetOpt,
    RawOpt,
    SetOpt,
    TrustOpt,
    VerboseOpt,
    config_or_exit,
    console,
    error,
    one_line,
    out,
    prompt_problems,
    run_stage,
    setup_logging,
)
from mole.eval.plots import token_routing
from mole.io import write_text_atomic

if TYPE_CHECKING:  # the audit loads torch; the CLI imports this module at start, so types only
    from mole.routing.explain import Explanation

# Expert i's colour (matplotlib's tab10, then tab20's light half): the same in the terminal, HTML and PNG.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
           "#dbdb8d")  # fmt: skip
SUFFIXES = (".html", ".htm", ".png")


def colour(expert: int) -> str:
    """The hex colour of expert index ``expert`` (the palette repeats after 18 experts)."""
    return PALETTE[expert % len(PALETTE)]


def tint(expert: int, weight: float) -> str:
    """Expert's colour faded towards white as its weight falls: full colour at 1, a quarter of it at 0."""
    rgb = [int(colour(expert)[i : i + 2], 16) for i in (1, 3, 5)]
    f = 0.25 + 0.75 * max(0.0, min(1.0, weight))
    return "#" + "".join(f"{round(255 + (c - 255) * f):02x}" for c in rgb)


def shown(token: str) -> str:
    """A token as one readable cell: quoted, with newlines and tabs escaped (``" the"``, ``"\\n"``)."""
    return json.dumps(token, ensure_ascii=False)


def top_k(exp: Explanation) -> int:
    """How many experts the views rank per token: the routed top-k, at least 2 (to show what came second)."""
    routed = int((exp.per_block > 0).sum(-1).max()) if exp.per_block.size else 1  # experts a token got in a block
    return min(len(exp.experts), max(2, routed))


def explain(
    model: ModelOpt,
    prompt: Annotated[list[str], typer.Option("--prompt", metavar="TEXT", help="A prompt to audit (repeatable).")],
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: evaluate.max_new_tokens.")] = None,
    per_block: Annotated[bool, typer.Option("--per-block", help="Also each block's top expert per token.")] = False,
    out_files: Annotated[
        list[Path] | None, typer.Option("--out", "-o", metavar="FILE", help="Write FILE.html or FILE.png (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the audit as JSON (full precision).")] = False,
    raw: RawOpt = False,
    trust_remote_code: TrustOpt = False,
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Audit routing: complete prompts (greedily, as predict does) and show the experts each token went to."""
    setup_logging(verbose)
    cfg = config_or_exit(config, preset, set_)
    if problems := _problems(prompt, max_new_tokens, out_files or []):  # before any model loads: costs nothing
        error("explain:", "; ".join(problems))
        raise typer.Exit(2)
    from flows.lineage import tracking_uri  # deferred: torch, MLflow (mole --help starts without them)
    from flows.packaging import load_model
    from mole.routing.explain import explain as audit

    trust = trust_remote_code or cfg.base_model.trust_remote_code
    new = max_new_tokens if max_new_tokens is not None else cfg.evaluate.max_new_tokens

    def run(c: BuildConfig) -> dict[str, Any]:
        mole = load_model(model, uri=tracking_uri(c), trust_remote_code=trust)
        return {"out": audit(mole, prompt, max_new_tokens=new, raw=raw)}

    explanations = run_stage("explain", run, cfg)["out"]
    if as_json:  # plain stdout: data for scripts
        typer.echo(json.dumps([e.to_dict(per_block=per_block) for e in explanations], ensure_ascii=False))
    else:
        for exp in explanations:
            show(exp, per_block=per_block)
    for f in out_files or []:
        try:
            console.print(f"wrote {write(explanations, f, per_block=per_block)}", markup=False, highlight=False)
        except OSError as exc:
            error("explain failed:", one_line(exc))
            raise typer.Exit(1) from None


def _problems(prompts: list[str], max_new_tokens: int | None, out_files: list[Path]) -> list[str]:
    """What is wrong with the command's values, one line each."""
    bad = [f"--out {f}: expected a file ending in {', '.join(SUFFIXES)}" for f in out_files
           if f.suffix.lower() not in SUFFIXES]  # fmt: skip
    return prompt_problems(prompts, max_new_tokens) + bad


def _header(exp: Explanation) -> str:
    how = "cluster routing (one expert per row)" if exp.routing == "cluster" else "token routing"
    shared = f"; shared expert {exp.shared} on every token" if exp.shared else ""
    n = len(exp.tokens)
    return f"{how}{shared}; {exp.n_prompt} prompt + {n - exp.n_prompt} completion tokens, {len(exp.per_block)} blocks"


# --------------------------------------------------------------------------------------------------- terminal
def show(exp: Explanation, *, per_block: bool = False) -> None:
    """Print one audit on stdout: the experts' colours, the tokens coloured by their top expert, then a table of
    each token's heaviest experts (``per_block``: and a table of each block's top expert per token)."""
    out.print(Text.assemble(("prompt ", "bold"), shown(exp.prompt), ("  completion ", "bold"), shown(exp.completion)))
    out.print(_header(exp), highlight=False)
    out.print(Text.assemble("experts: ", *_legend(exp)))
    out.print(_coloured(exp))
    out.print(_table(exp))
    if per_block:
        out.print(_block_table(exp))


def _legend(exp: Explanation) -> Iterable[Text | str]:
    for i, eid in enumerate(exp.experts):
        yield Text(f" {eid} ", style=f"black on {colour(i)}")
        yield " "


def _coloured(exp: Explanation) -> Text:
    text = Text()
    for t, (token, ranked) in enumerate(zip(exp.tokens, exp.ranked(1), strict=True)):
        if t == exp.n_prompt:
            text.append(" ▸ ", style="bold")  # where the completion starts
        e, w = ranked[0]
        text.append(token.replace("\n", "⏎\n"), style=f"black on {tint(e, w)}")
    return text


def _table(exp: Explanation) -> Table:
    k = top_k(exp)
    names = ["top expert", "second", "third"] + [f"#{i}" for i in range(4, k + 1)]
    table = Table("#", "token", "part", title="routing per token (mean over blocks)", title_justify="left")
    for name in names[:k]:
        table.add_column(name)
        table.add_column("weight", justify="right")
    for t, ranked in enumerate(exp.ranked(k)):
        cells = [c for e, w in ranked for c in (Text(exp.experts[e], style=colour(e)), f"{w:.3f}")]
        part = "prompt" if t < exp.n_prompt else "completion"
        table.add_row(str(t), shown(exp.tokens[t]), part, *cells, *["—"] * (2 * k - len(cells)))
    return table


def _block_table(exp: Explanation) -> Table:
    table = Table("#", "token", title="top expert per block (weight)", title_justify="left")
    for b in range(len(exp.per_block)):
        table.add_column(f"block {b}")
    tops = [exp.ranked(1, block=b) for b in range(len(exp.per_block))]
    for t, token in enumerate(exp.tokens):
        cells = [Text(f"{exp.experts[top[t][0][0]]} {top[t][0][1]:.3f}", style=colour(top[t][0][0])) for top in tops]
        table.add_row(str(t), shown(token), *cells)
    return table


# ------------------------------------------------------------------------------------------------------ files
def write(explanations: list[Explanation], path: str | Path, *, per_block: bool = False) -> Path:
    """Write the audits to ``path``: an HTML page (``.html``) or a PNG heatmap (``.png``)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--out {path}: expected a file ending in {', '.join(SUFFIXES)}")
    if path.suffix.lower() == ".png":
        return token_routing(explanations, path, per_block=per_block)
    write_text_atomic(path, page(explanations, per_block=per_block))
    return path


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
.tokens{font-family:monospace;white-space:pre-wrap;line-height:1.9;font-size:15px}
.tok{padding:2px 0;border-radius:2px}.sep{font-weight:bold;padding:0 .4em}
.key{font-family:monospace;padding:2px 6px;margin-right:6px;border-radius:3px}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ddd;padding:2px 8px}
td.w{text-align:right;font-family:monospace}td.t{font-family:monospace;white-space:pre}"""


def page(explanations: list[Explanation], *, per_block: bool = False) -> str:
    """The audits as one self-contained HTML page (a section per prompt; hover a token for its weights)."""
    body = "".join(_section(i, exp, per_block) for i, exp in enumerate(explanations))
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>mole explain</title><style>{CSS}</style>"
            f"</head><body><h1>mole explain: routing per token</h1>{body}</body></html>\n")  # fmt: skip


def _section(i: int, exp: Explanation, per_block: bool) -> str:
    esc = html.escape
    legend = "".join(f"<span class='key' style='background:{colour(e)}'>{esc(eid)}</span>"
                     for e, eid in enumerate(exp.experts))  # fmt: skip
    tokens = []
    for t, (token, ranked) in enumerate(zip(exp.tokens, exp.ranked(len(exp.experts)), strict=True)):
        if t == exp.n_prompt:
            tokens.append("<span class='sep' title='completion starts'>▸</span>")
        title = esc(", ".join(f"{exp.experts[e]} {w:.3f}" for e, w in ranked), quote=True)
        style = f"background:{tint(*ranked[0])}"
        tokens.append(f"<span class='tok' style='{style}' title='{title}'>{esc(token)}</span>")
    parts = [f"<section><h2>Prompt {i + 1}</h2><p><b>prompt</b> <code>{esc(shown(exp.prompt))}</code> "
             f"<b>completion</b> <code>{esc(shown(exp.completion))}</code></p><p>{esc(_header(exp))}</p>",
             f"<p>experts: {legend}</p><div class='tokens'>{''.join(tokens)}</div>", _html_table(exp)]  # fmt: skip
    if per_block:
        parts.append(_html_block_table(exp))
    return "".join(parts) + "</section>"


def _cell(exp: Explanation, e: int, w: float) -> str:
    return (
        f"<td style='color:{colour(e)};font-weight:bold'>{html.escape(exp.experts[e])}</td><td class='w'>{w:.3f}</td>"
    )


def _html_table(exp: Explanation) -> str:
    k = top_k(exp)
    head = "".join(f"<th>{n}</th><th>weight</th>" for n in (["top expert", "second", "third"] + [
        f"#{i}" for i in range(4, k + 1)])[:k])  # fmt: skip
    rows = []
    for t, ranked in enumerate(exp.ranked(k)):
        cells = "".join(_cell(exp, e, w) for e, w in ranked) + "<td>—</td>" * (2 * (k - len(ranked)))
        part = "prompt" if t < exp.n_prompt else "completion"
        rows.append(
            f"<tr><td>{t}</td><td class='t'>{html.escape(shown(exp.tokens[t]))}</td><td>{part}</td>{cells}</tr>"
        )
    return (f"<h3>Routing per token (mean over {len(exp.per_block)} blocks)</h3><table><tr><th>#</th><th>token</th>"
            f"<th>part</th>{head}</tr>{''.join(rows)}</table>")  # fmt: skip


def _html_block_table(exp: Explanation) -> str:
    blocks = range(len(exp.per_block))
    tops = [exp.ranked(1, block=b) for b in blocks]
    rows = "".join(f"<tr><td>{t}</td><td class='t'>{html.escape(shown(token))}</td>"
                   + "".join(_cell(exp, *top[t][0]) for top in tops) + "</tr>"
                   for t, token in enumerate(exp.tokens))  # fmt: skip
    head = "".join(f"<th colspan='2'>block {b}</th>" for b in blocks)
    return f"<h3>Top expert per block</h3><table><tr><th>#</th><th>token</th>{head}</tr>{rows}</table>"
