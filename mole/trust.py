"""Remote code is the user's choice alone: files a build wrote, or someone sent, never switch it on."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def remote_code(saved: Any, allowed: bool, source: str | Path) -> bool:
    """Whether to run a model's own code: only when a saved file asks for it *and* the caller allows it.

    Args:
        saved: the ``trust_remote_code`` a file (``source``) carries; anything but ``True`` means no.
        allowed: the user's own choice (their config's ``base_model.trust_remote_code`` or a CLI flag).
        source: the file, named in the error.

    Raises:
        PermissionError: the file asks for remote code and the caller did not allow it.
    """
    if saved is True and not allowed:
        raise PermissionError(
            f"{source}: sets trust_remote_code=true, which would run the base model's own Python code; a saved "
            "model cannot switch that on. If you trust this model, allow it yourself: `--trust-remote-code` on the "
            "command line, or base_model.trust_remote_code: true in your own params.yaml"
        )
    return saved is True and allowed
