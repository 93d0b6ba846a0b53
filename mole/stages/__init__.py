"""The pipeline's stages: their registry (``STAGES``) and their functions (:mod:`mole.stages.pipeline`).

Stages are the only code that writes the workspace (paths: :mod:`mole.workspace`); the CLI, ``dvc repro`` and the
Prefect flow all run them through ``STAGES``. ``stages.prepare`` etc. are the pipeline's functions, loaded on first
use so that importing the registry (the CLI does, to list its commands) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from mole.stages.registry import STAGES, Output, Stage, dvc_yaml

PIPELINE = ("prepare", "cluster", "train_experts", "train_router", "evaluate", "merge_prune", "begin",
            "check_writable", "recover_workspace")  # fmt: skip

__all__ = ["STAGES", "Output", "Stage", "dvc_yaml", *PIPELINE]


def __getattr__(name: str) -> Any:
    if name in PIPELINE:
        return getattr(importlib.import_module("mole.stages.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
