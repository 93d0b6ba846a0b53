"""Run the mole CLI and SIGKILL it just before its n-th ``os.replace``: the commit point of every atomic write.

    python tests/crashpoint.py N LOG -- <mole args>

N = 0 never kills. Each call is appended to LOG as ``<n> <src> -> <dst>`` (before it happens), so a test can count
a stage's commit points and pick the one to kill at, e.g. the second rename of a directory swap.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def main() -> None:
    kill_at, log = int(sys.argv[1]), Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    real, calls = os.replace, [0]

    def replace(src: object, dst: object, **kw: object) -> None:
        calls[0] += 1
        with log.open("a", encoding="utf-8") as fh:
            fh.write(f"{calls[0]} {src} -> {dst}\n")
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, **kw)

    os.replace = replace
    from mole.cli import app

    sys.argv = ["mole", *args]
    app()


if __name__ == "__main__":
    main()
