"""``mole build``: the whole build as the Prefect flow ``build-mole``, full or incremental from a previous model.

Part of the app layer with :mod:`mole.cli`, which registers the command. ``--from MODEL`` starts from a previous
build (``models:/<name>@champion``, a workspace or a MoLE model dir): ``build.previous`` = MODEL, and
``build.incremental`` = auto unless the config says always. ``--full`` is a full build whatever the config says.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from mole.console import (
    ConfigOpt,
    PresetOpt,
    SetOpt,
    VerboseOpt,
    config_or_exit,
    console,
    error,
    log_bars,
    prefect_env,
    setup_logging,
    summary,
)

FromOpt = Annotated[
    str | None,
    typer.Option("--from", metavar="MODEL", help="Start from this previous build: models:/<name>@champion, a "
                 "workspace or a MoLE model dir (build.previous); its unchanged experts are reused."),
]  # fmt: skip
FullOpt = Annotated[bool, typer.Option("--full", help="A full build, whatever build.incremental says.")]


def build(
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    from_: FromOpt = None,
    full: FullOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the whole build as the Prefect flow `build-mole` (on a temporary server unless PREFECT_API_URL is set)."""
    setup_logging(verbose)
    if from_ is not None and full:
        error("error:", "--from and --full contradict each other: --full builds from scratch")
        raise typer.Exit(2)
    cfg = config_or_exit(config, preset, set_)
    if from_ is not None:
        mode = "always" if cfg.build.incremental == "always" else "auto"
        cfg = cfg.model_copy(update={"build": cfg.build.model_copy(update={"previous": from_, "incremental": mode})})
    elif full:
        cfg = cfg.model_copy(update={"build": cfg.build.model_copy(update={"incremental": "never"})})
    prefect_env()
    from flows.build import build_mole

    api = os.environ.get("PREFECT_API_URL")
    console.print(f"Prefect API: {api or 'a temporary local server (set PREFECT_API_URL to watch runs in the UI)'}")
    start = time.perf_counter()
    with log_bars("flows.progress"):  # the build's steps and its training runs (those in this process) as bars
        state = build_mole(config=cfg, return_state=True)
    run_id = state.state_details.flow_run_id
    if not state.is_completed():
        error("build failed", f"(flow run {run_id}): {state.message}")
        raise typer.Exit(1)
    result = state.result()
    console.print(f"[green]✓[/] build ({time.perf_counter() - start:.1f}s)")
    from flows.deployments import flow_run_url

    where = {"flow run": flow_run_url(run_id) if api else str(run_id)}
    summary("build", {**where, **{k: v for k, v in result.items() if v is not None}})
