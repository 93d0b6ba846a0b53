"""``mole diff OLD NEW``: which experts changed between two models, by content hash (mole.nn.lineage).

Part of the app layer with :mod:`mole.cli`, which registers the command. A side is a registered version
(``models:/<name>/<version>`` or ``models:/<name>@<alias>``: its ``mole.experts`` tag, one query to the tracking
server, no download) or a model directory (``artifacts/mole``, or an MLflow model dir holding ``artifacts/mole``:
the hashes are computed from its files, so it works without a tracking server). The terminal gets a table with
12-character hashes; ``--json`` gives full hashes and every known field.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from mole.config import BuildConfig
from mole.console import ConfigOpt, PresetOpt, SetOpt, VerboseOpt, config_or_exit, error, one_line, out, setup_logging
from mole.workspace import SPEC_FILE

STYLE = {"changed": "yellow", "added": "green", "removed": "red", "unchanged": "dim"}
SHORT = 12  # hex digits of a hash in the table
SIDE = "models:/<name>/<version>, models:/<name>@<alias> or a MoLE model dir (artifacts/mole)"


def diff(
    old: Annotated[str, typer.Argument(metavar="OLD", help=f"The model before: {SIDE}.")],
    new: Annotated[str, typer.Argument(metavar="NEW", help=f"The model after: {SIDE}.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON (full hashes).")] = False,
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Show which experts changed between two models: per expert id unchanged, changed, added or removed, with
    content hashes, rows and steps (registered versions through the tracking server, or model directories)."""
    setup_logging(verbose)
    cfg = config_or_exit(config, preset, set_)
    from mole.nn.lineage import brief, compare  # deferred: torch (mole --help starts without it)

    sides = []
    for name, ref in (("OLD", old), ("NEW", new)):
        try:
            label, records = load_side(ref, cfg)
        except (LookupError, ValueError, OSError, RuntimeError) as exc:  # a bad side: 2; a server or disk failing: 1
            error("diff:", f"{name} {one_line(exc)}")
            raise typer.Exit(2 if isinstance(exc, LookupError | ValueError | FileNotFoundError) else 1) from None
        sides.append((ref, label, {eid: brief(r) for eid, r in records.items()}))
    rows = compare(sides[0][2], sides[1][2])
    counts = Counter(r["status"] for r in rows)
    if as_json:  # plain stdout: data for scripts
        doc = {"old": {"ref": old, "label": sides[0][1]}, "new": {"ref": new, "label": sides[1][1]},
               "counts": {s: counts.get(s, 0) for s in STYLE}, "experts": rows}  # fmt: skip
        typer.echo(json.dumps(doc, ensure_ascii=False))
        return
    out.print(Text.assemble(("old ", "bold"), sides[0][1], ("  new ", "bold"), sides[1][1]), highlight=False)
    out.print(table(rows))
    out.print(", ".join(f"{counts.get(s, 0)} {s}" for s in STYLE), highlight=False)


def load_side(ref: str, cfg: BuildConfig) -> tuple[str, dict[str, dict[str, Any]]]:
    """(label, expert id -> lineage record) of one side: a registered version or a model directory.

    Raises:
        LookupError: no such registered model, version or alias (or no expert tags on it).
        RuntimeError: the tracking server cannot be reached.
        FileNotFoundError: a path that does not exist or is not a MoLE model dir.
        ValueError: a URI that is neither ``models:/<name>/<version>`` nor ``models:/<name>@<alias>``.
    """
    if ref.startswith("models:/"):
        from flows.lineage import tracking_uri  # deferred: MLflow
        from flows.versions import version_experts

        return version_experts(ref, uri=tracking_uri(cfg))
    if "://" in ref or ref.startswith("runs:/"):
        raise ValueError(f"{ref!r}: expected models:/<name>/<version>, models:/<name>@<alias> or a model directory")
    from mole.nn.lineage import model_experts

    path = Path(ref)
    if not path.is_dir():
        raise FileNotFoundError(f"{ref}: no such directory (expected a MoLE model dir such as artifacts/mole, or "
                                "models:/<name>/<version>)")  # fmt: skip
    if not (path / SPEC_FILE).is_file() and (path / "artifacts" / "mole" / SPEC_FILE).is_file():
        path = path / "artifacts" / "mole"  # an MLflow model dir (mlflow artifacts download): the MoLE model in it
    return str(path), model_experts(path)


def table(rows: list[dict[str, Any]]) -> Table:
    """The comparison as a rich table: expert, status, both short hashes, rows, steps, and a note."""
    t = Table("expert", "status", "old sha256", "new sha256", "rows", "steps", "note", title_justify="left")
    for r in rows:
        a, b = r["old"] or {}, r["new"] or {}
        hashes = [x["sha256"][:SHORT] if x else "—" for x in (a, b)]
        status = Text(r["status"], style=STYLE[r["status"]])
        t.add_row(r["id"], status, *hashes, _pair(a, b, _rows), _pair(a, b, _steps), note(r))
    return t


def _rows(record: dict[str, Any]) -> str | None:
    return None if record.get("rows") is None else str(record["rows"])


def _steps(record: dict[str, Any]) -> str | None:
    if record.get("steps") is None:
        return None
    joint = record.get("joint_steps") or 0
    return f"{record['steps']} + {joint} joint" if joint else str(record["steps"])


def _pair(old: dict[str, Any], new: dict[str, Any], field: Any) -> str:
    """One side's value, or ``old → new`` when both are known and differ; ``?`` where unknown."""
    a, b = (field(x) if x else None for x in (old, new))
    if old and new and a != b:
        return f"{a or '?'} → {b or '?'}"
    return (b if new else a) or "?"


def note(row: dict[str, Any]) -> str:
    """What the lineage says about a row: a merge's parents, weights fine-tuned from the old ones, an expert whose
    files changed after its lineage was written."""
    old, new = row["old"] or {}, row["new"] or {}
    parents = (new or old).get("parents") or []
    notes = []
    if len(parents) > 1:
        notes.append("merge of " + " + ".join(str(p.get("id")) for p in parents))
    elif row["status"] == "changed" and old.get("sha256") in {p.get("sha256") for p in parents}:
        notes.append("fine-tuned from the old weights")
    elif row["status"] == "changed" and parents and parents == old.get("parents"):
        notes.append("same trained adapter; changed after it (joint phase)")
    if (new or old).get("recorded_sha256"):
        notes.append("files changed after lineage.json was written")
    return "; ".join(notes)
