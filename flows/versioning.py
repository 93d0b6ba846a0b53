"""DVC versioning of a build's datasets and adapters: the workspace as a DVC repo, ``dvc commit``, ``dvc push``.

The pipeline is the project's dvc.yaml (its stages run ``mole <stage>``). A workspace that has none, such as a
temporary directory, gets a copy whose code dependencies point at the installed ``mole`` sources, and a
params.yaml with the build's resolved config when it has none either. The default remote is the local
directory ``<workspace>/.dvc/remote-storage``, written as an absolute path so that clones on the same machine
pull from it; ``dvc.remote`` names any other (a directory, or ``s3://…`` with the dvc-s3 plugin).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

import mole
from mole.config import BuildConfig, ConfigError, load_config

logger = logging.getLogger(__name__)

PROJECT_DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
REMOTE_NAME = "mole"
DEFAULT_REMOTE = ".dvc/remote-storage"
DVCIGNORE = (".mole-tmp-*", ".mole-merge-*")  # atomic-write temp dirs inside outs are never data
GITIGNORE = ("/mlflow.db", "/mlruns/", "/mlartifacts/", ".mole-tmp-*", "/.mole/")  # .mole/: stage timings


def record_outputs(cfg: BuildConfig) -> dict[str, Any]:
    """Record the stages' outs in dvc.lock (``dvc commit -f``) and push them when ``dvc.push``.

    Args:
        cfg: the build's config; ``cfg.workspace`` holds the outputs of every stage.

    Returns:
        {"hashes": {out path: md5}, "remote": URL, "pushed": bool, "lock": path of dvc.lock}.

    Raises:
        RuntimeError: a dvc command failed (its command line, exit code and error are in the message).
    """
    ws = ensure_repo(cfg)
    _warn_if_params_differ(cfg, ws)
    dvc(ws, "commit", "--force")
    hashes = lock_hashes(ws)
    pushed = False
    if cfg.dvc.push:
        dvc(ws, "push")
        pushed = True
    remote = _remote_url(ws)
    logger.info("DVC: %d outs recorded in %s, pushed=%s to %s", len(hashes), ws / "dvc.lock", pushed, remote)
    return {"hashes": hashes, "remote": remote, "pushed": pushed, "lock": str(ws / "dvc.lock")}


def ensure_repo(cfg: BuildConfig) -> Path:
    """Make ``cfg.workspace`` a DVC repo with the pipeline, params.yaml, ignore files and the remote; idempotent.

    Returns:
        The absolute workspace path.
    """
    ws = Path(cfg.workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    top = _git_toplevel(ws)
    if not (ws / ".dvc").is_dir():
        flags = ["--no-scm"] if top is None else (["--subdir"] if top != ws else [])
        dvc(ws, "init", "--quiet", *flags)
    if not (ws / "dvc.yaml").exists():
        write_pipeline(ws)
    if not (ws / "params.yaml").exists():
        dumped = cfg.model_dump(mode="json") | {"workspace": "."}  # stages run with the workspace as cwd
        _write_text(ws / "params.yaml", yaml.safe_dump(dumped, sort_keys=False))
    _append_lines(ws / ".dvcignore", DVCIGNORE)
    if top is not None:
        _append_lines(ws / ".gitignore", (*GITIGNORE, f"/{cfg.merge.keep_dir.strip('/')}/"))
    _configure_remote(cfg, ws)
    return ws


def write_pipeline(ws: Path) -> Path:
    """Write the project's dvc.yaml into ``ws``; code deps not present there point at the installed sources."""
    if not PROJECT_DVC_YAML.exists():
        raise FileNotFoundError(f"{PROJECT_DVC_YAML} does not exist; copy dvc.yaml from the mole repository")
    pipeline = yaml.safe_load(PROJECT_DVC_YAML.read_text(encoding="utf-8"))
    sources = Path(mole.__file__).resolve().parent.parent
    for stage in pipeline["stages"].values():
        stage["deps"] = [
            str(sources / d) if d.startswith("mole/") and not (ws / d).exists() else d for d in stage.get("deps", [])
        ]
    header = f"# Written by flows/versioning.py from {PROJECT_DVC_YAML}; see the comments there.\n"
    return _write_text(ws / "dvc.yaml", header + yaml.safe_dump(pipeline, sort_keys=False))


def lock_hashes(ws: Path) -> dict[str, str]:
    """{out path: md5} of every stage out in ``ws/dvc.lock`` (directories end in ``.dir``)."""
    lock = ws / "dvc.lock"
    if not lock.exists():
        raise FileNotFoundError(f"{lock} does not exist; run `dvc repro` or record_outputs first")
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", []) if "md5" in o}


def dvc(ws: Path, *args: str, timeout: float = 600) -> str:
    """Run ``dvc ARGS`` in ``ws`` (this interpreter's dvc); its stdout, or a RuntimeError naming the command."""
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}  # no network calls home from our subprocesses
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {ws} (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def _configure_remote(cfg: BuildConfig, ws: Path) -> None:
    """``dvc.remote`` (or $MOLE_DVC_REMOTE) as the default remote; else keep the repo's default; else the local one."""
    url = cfg.dvc.remote or os.environ.get("MOLE_DVC_REMOTE") or None
    if url is None:
        if _remote_url(ws) is not None:
            return
        url = str(ws / DEFAULT_REMOTE)
        _append_lines(ws / ".dvc" / ".gitignore", ("/remote-storage",))
    elif "://" not in url:
        url = str((ws / url).resolve())  # a relative dir means relative to the workspace
    if _remote_url(ws) != url:
        dvc(ws, "remote", "add", "--force", "--default", REMOTE_NAME, url)


def _remote_url(ws: Path) -> str | None:
    """URL of the repo's default remote (read in-process: cheaper than two dvc commands), or None."""
    from dvc.repo import Repo

    with Repo(str(ws)) as repo:
        config = repo.config
        name = config["core"].get("remote")
        return config["remote"].get(name, {}).get("url") if name else None


def _warn_if_params_differ(cfg: BuildConfig, ws: Path) -> None:
    """dvc.lock records params.yaml; say so when the build ran with other values (a preset or --set)."""
    try:
        on_disk = load_config(ws / "params.yaml").model_dump(mode="json")
    except ConfigError as exc:
        logger.warning("DVC: %s is not a valid mole config (%s); dvc.lock params may be wrong", ws / "params.yaml", exc)
        return
    from flows.lineage import flatten

    a, b = flatten(on_disk | {"workspace": "."}), flatten(cfg.model_dump(mode="json") | {"workspace": "."})
    diff = [f"{k} (params.yaml {a.get(k)}, build {b.get(k)})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        logger.warning(
            "DVC: dvc.lock records %s, which differs from this build's config at %s; the MLflow run holds the "
            "build's config", ws / "params.yaml", "; ".join(diff[:8]) + (" …" if len(diff) > 8 else "")
        )  # fmt: skip


def _git_toplevel(ws: Path) -> Path | None:
    try:
        proc = subprocess.run(["git", "-C", str(ws), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    except OSError:
        return None
    return Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None


def _append_lines(path: Path, lines: tuple[str, ...] | list[str]) -> None:
    """Add the lines ``path`` lacks (creating it), keeping what is there."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    missing = [ln for ln in lines if ln not in text.splitlines()]
    if missing:
        _write_text(path, text + ("" if not text or text.endswith("\n") else "\n") + "\n".join(missing) + "\n")


def _write_text(path: Path, text: str) -> Path:
    from mole.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
