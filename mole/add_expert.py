"""``mole add-expert PATH --name NAME``: import an external peft LoRA adapter into the workspace's gallery.

Part of the app layer with :mod:`mole.cli`, which registers the command; the checks and the copy are
:func:`mole.training.gallery.add_expert`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mole.console import ConfigOpt, PresetOpt, SetOpt, VerboseOpt, config_or_exit, run_stage, setup_logging, summary


def add_expert(
    path: Annotated[str, typer.Argument(metavar="DIR", help="A peft LoRA adapter dir (safetensors weights).")],
    name: Annotated[str, typer.Option("--name", "-n", help="The expert's name in the gallery.")],
    rows: Annotated[
        Path | None,
        typer.Option(
            "--rows",
            metavar="FILE",
            help="Rows of what this expert is for (a data file as data.source takes): a build "
            "with it in experts.gallery warm-starts its router row from them.",
        ),
    ] = None,
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Add an external peft LoRA adapter to the workspace's gallery (artifacts/gallery/NAME), once it is checked
    against the base model (name, revision, shapes), the bank's target modules and dtypes; another rank is fine.
    A build uses it when experts.gallery names it."""
    setup_logging(verbose)
    cfg = config_or_exit(config, preset, set_)
    from mole.training.gallery import add_expert as add  # deferred: torch (mole --help starts without it)

    res = run_stage("add-expert", lambda c: add(c, path, name, rows=rows), cfg)
    summary(f"gallery expert {name}", {k: v for k, v in res.items() if k != "name"})
