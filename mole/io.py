"""Atomic file writes: every workspace file is written to a temp path beside it and renamed into place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".mole-tmp-{target.name}.", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _follow_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes the umask gives new files and directories.

    mkdtemp makes 0700 and safetensors writes 0600, which would keep a model from a serving account.
    """
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


TMP_PREFIX = ".mole-tmp-"
OLD_SUFFIX = ".old"  # atomic_dir's previous version of a target, while the new one is being swapped in


def recover(roots: Iterable[str | Path]) -> list[str]:
    """Repair what a killed atomic write left in the directories ``roots``; returns what was done, one per path.

    A kill between the two renames of :func:`atomic_dir` leaves the target missing and its previous version as
    ``.mole-tmp-<name>.old``: that version is put back (the stage that was writing then runs again). Every other
    ``.mole-tmp-*`` entry is an unfinished write and is removed. Call it before a stage starts, not while another
    process writes into the same workspace.
    """
    done = []
    for root in {Path(r) for r in roots}:
        if not root.is_dir():
            continue
        for path in sorted(root.glob(f"{TMP_PREFIX}*")):  # temps live beside their target
            name = path.name.removeprefix(TMP_PREFIX)
            target = path.with_name(name.removesuffix(OLD_SUFFIX))
            if name.endswith(OLD_SUFFIX) and path.is_dir() and not target.exists():
                os.replace(path, target)
                done.append(f"restored {target} from the previous version (a write was interrupted)")
            else:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                done.append(f"removed the unfinished write {path}")
    return done


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``target``; swap it in for ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_one(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent))
    try:
        yield tmp
        _follow_umask(tmp)
        old = target.with_name(f"{TMP_PREFIX}{target.name}{OLD_SUFFIX}")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def seal(directory: str | Path, names: Iterable[str]) -> dict[str, str]:
    """The SHA-256 of each named file of ``directory``: recorded when it is written, checked before it is reused."""
    return {name: sha256_file(Path(directory) / name) for name in names}


def seal_broken(directory: str | Path, sealed: dict[str, str]) -> str | None:
    """None when every sealed file of ``directory`` still has its recorded digest, else what is wrong (one line)."""
    for name, digest in sealed.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} does not match the digest recorded when it was written (truncated or modified)"
    return None


def recover_one(target: Path) -> None:
    """Put back ``target``'s previous version if a killed :func:`atomic_dir` swap left it missing."""
    old = target.with_name(f"{TMP_PREFIX}{target.name}{OLD_SUFFIX}")
    if old.is_dir() and not target.exists():
        os.replace(old, target)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n", encoding="utf-8")
    return Path(path)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSON lines, atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    """Save a numpy array (no pickle), atomically."""
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file written by mole; a damaged one fails naming the file and line.

    Raises:
        ValueError: a line is not JSON, or the file is not UTF-8.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 at byte {exc.start}: damaged; re-run the stage that wrote it") from None
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # "\n" only: rows may hold U+2028 raw
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: damaged ({exc.msg}); re-run the stage that wrote it") from None
    return rows


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by mole; a damaged one fails naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: damaged ({exc}); re-run the stage that wrote it") from None


def load_safetensors(path: str | Path) -> dict[str, Any]:
    """``safetensors.torch.load_file`` whose errors name the file (a truncated file says only 'invalid header')."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the weights ({exc}); the file is damaged or truncated") from None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
