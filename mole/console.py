"""The command line's console: the options commands share, logging, errors as one line, stage runs under spinners
or progress bars, tables.

Part of the app layer with :mod:`mole.cli`.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from mole.config import BuildConfig, ConfigError, load_config

console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", metavar="FILE", help="params.yaml to read.")]
# The presets shipped in mole/presets/, offered as the choices of --preset.
Preset = enum.Enum("Preset", {p.stem: p.stem for p in sorted((Path(__file__).parent / "presets").glob("*.yaml"))},
                   type=str)  # fmt: skip
PresetOpt = Annotated[Preset | None, typer.Option("--preset", "-p", help="Preset applied over the config.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override one value, e.g. --set cluster.k=4 (repeatable)."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging of mole (not other libraries).")]
# The options of the commands that load a model (predict, explain).
ModelOpt = Annotated[str, typer.Option("--model", "-m", metavar="URI_OR_DIR",
                                       help="models:/<name>@champion, an MLflow or MoLE model dir.")]  # fmt: skip
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow the base model's own Python code (off by default).")
]
RawOpt = Annotated[
    bool, typer.Option("--raw", help="Send prompts as given, without the training prompts' ending (e.g. Answer:).")
]
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="torch.compile the model's blocks first (default: router.compile).")
]


OWN_LOGGERS = ("mole", "flows", "bench")


def prefect_env() -> None:
    """Prefect settings mole runs with unless the user set them: library logs in the UI, no analytics."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mole")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server starts in 4-9 s on an idle machine; give a busy one more time before giving up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def setup_logging(verbose: bool) -> None:
    """Log through rich to stderr, quieting the chattiest libraries; ``verbose`` turns on debug for mole's own
    loggers (``mole``, ``flows``, ``bench``) only, so other libraries' debug output does not flood the terminal."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        handlers=[_named(RichHandler(console=console, show_path=False, rich_tracebacks=False))],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "sentence_transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for ours in OWN_LOGGERS:
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.NOTSET)


class _RunNames(logging.Formatter):
    """Prefix a Prefect run's log line with the task (or flow) run it comes from, so "Finished in state
    Completed()" says what finished."""

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        return f"{name}: {super().format(record)}" if name else super().format(record)


def _named(handler: logging.Handler) -> logging.Handler:
    handler.setFormatter(_RunNames("%(message)s"))
    return handler


def error(label: str, message: object) -> None:
    """Print ``label`` in red, then ``message`` verbatim: no rich markup, so ``file.json[item 3]`` stays whole."""
    console.print(Text.assemble((label, "bold red"), " ", str(message)), highlight=False, soft_wrap=True)


def config_or_exit(config: Path, preset: Preset | str | None, overrides: list[str] | None) -> BuildConfig:
    """A command's config (params.yaml < preset < each --set); a config error is one red line and exit status 2."""
    try:
        name = preset.value if isinstance(preset, Preset) else preset
        return load_config(config, preset=name, overrides=overrides or [])
    except ConfigError as exc:
        error("config error:", exc)
        raise typer.Exit(2) from None


def prompt_problems(prompts: list[str], max_new_tokens: int | None, temperature: float = 0.0) -> list[str]:
    """What is wrong with a generating command's ``--prompt``s, ``--max-new-tokens`` and ``--temperature``, one line
    each (checked before any model loads: a bad value costs nothing)."""
    problems = [f"--prompt #{i + 1}: the prompt is empty" for i, p in enumerate(prompts) if not p.strip()]
    if max_new_tokens is not None and max_new_tokens < 1:
        problems.append(f"--max-new-tokens: {max_new_tokens} is not a positive number of tokens")
    if temperature < 0:
        problems.append(f"--temperature: {temperature} is negative (0 decodes greedily)")
    return problems


def one_line(exc: BaseException) -> str:
    """An error as one line: an OSError names its path(s) and the OS's reason, not its errno tuple."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        return f"{paths}: {exc.strerror}"
    return str(exc)


def run_stage(name: str, fn: Callable[[BuildConfig], dict[str, Any]], cfg: BuildConfig) -> dict[str, Any]:
    """Run one stage under a spinner; its error becomes one red line and exit status 1."""
    start = time.perf_counter()
    with console.status(f"[bold]{name}[/] …"):
        try:
            result = fn(cfg)
        except (ValueError, OSError, RuntimeError) as exc:
            error(f"{name} failed:", one_line(exc))
            raise typer.Exit(1) from None
    console.print(f"[green]✓[/] {name} ({time.perf_counter() - start:.1f}s)")
    return result


def summary(title: str, rows: dict[str, Any]) -> None:
    """A two-column table of a stage's results, on stdout."""
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in rows.items():
        table.add_row(key, Text(value if isinstance(value, str) else json.dumps(rounded(value))))
    out.print(table)


def rounded(value: Any) -> Any:
    """``value`` with every float shown to meaningful digits (4 decimals, or 4 significant digits below 0.01)."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if value and abs(value) < 0.01 else round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def loss_note(loss: float) -> str:
    """``loss 1.2346`` beside a progress bar; nothing while no loss is known (NaN)."""
    return f"loss {loss:.4f}" if math.isfinite(loss) else ""


class Bars:
    """A rich progress bar per training run, fed by the library's ``progress(name, step, total, loss)`` calls."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, name: str, step: int, total: int, loss: float) -> None:
        self.update(name, step, total, loss_note(loss))

    def update(self, name: str, step: int, total: int, note: str) -> None:
        """Advance (or add) the bar ``name``: ``step`` of ``total``, with ``note`` beside it."""
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total, note="")
        self.progress.update(self.tasks[name], completed=step, total=total, note=note)

    def __enter__(self) -> Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class ProgressHandler(logging.Handler):
    """Feeds ``Bars`` from log records that carry ``progress = (name, step, total, note)``: the way a flow run in
    this process (``mole build``) reports its stages and training steps without knowing about the terminal."""

    def __init__(self, bars: Bars) -> None:
        super().__init__(logging.DEBUG)
        self.bars = bars

    def emit(self, record: logging.LogRecord) -> None:
        if (p := getattr(record, "progress", None)) is not None:
            self.bars.update(*p)


def run_with_bars(name: str, fn: Callable[..., dict[str, Any]], cfg: BuildConfig) -> dict[str, Any]:
    """``run_stage`` for a training stage: a progress bar per adapter or phase instead of a spinner."""
    start = time.perf_counter()
    with Bars() as bars:
        try:
            result = fn(cfg, progress=bars)
        except (ValueError, OSError, RuntimeError) as exc:
            bars.progress.stop()
            error(f"{name} failed:", one_line(exc))
            raise typer.Exit(1) from None
    console.print(f"[green]✓[/] {name} ({time.perf_counter() - start:.1f}s)")
    return result


def show_result(name: str, res: dict[str, Any]) -> None:
    """What a stage command prints of its result."""
    if name == "prepare":
        summary("prepared data", {k: v for k, v in res.items() if k != "paths"})
    elif name == "cluster":
        summary("clusters", {k: res[k] for k in ("k", "silhouette", "sizes", "ari", "embedder")})
    elif name == "train-experts":
        summary("experts", {k: v for k, v in res.items() if k not in ("paths", "experts")})
    elif name == "train-router":
        summary("MoLE model", {k: v for k, v in res.items() if k != "paths"} | {"dir": res["paths"]["dir"]})
    elif name == "evaluate":
        out.print(Path(res["paths"]["markdown"]).read_text(encoding="utf-8").split("![")[0], highlight=False)
    else:
        summary(name, {k: v for k, v in res.items() if k not in ("paths", "decisions")})


@contextlib.contextmanager
def log_bars(logger: str) -> Iterator[Bars]:
    """Bars fed by the ``progress`` records of ``logger`` (see :class:`ProgressHandler`) while the block runs."""
    handler, log = ProgressHandler(Bars()), logging.getLogger(logger)
    saved = (log.propagate, log.level, log.disabled)
    with handler.bars as bars:
        log.addHandler(handler)
        log.propagate, log.disabled = False, False  # a logging config (Prefect's) may have reset them
        log.setLevel(logging.INFO)
        try:
            yield bars
        finally:
            log.removeHandler(handler)
            log.propagate, log.disabled = saved[0], saved[2]
            log.setLevel(saved[1])
