"""The MLflow pyfunc form of a MoLE model: a DataFrame of prompts in, completions out.

This file is logged as an MLflow "model from code" (flows/registry.py passes its path to ``log_model``), so it
must stay self-contained: MLflow executes it on load, with the ``mole`` package bundled beside it as code.
The model's artifacts are ``mole`` (the ``artifacts/mole`` directory) and, when the base model was small
enough to bundle, ``base`` (its weights and tokenizer, with ``base.json`` saying how to load them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

MOLE_ARTIFACT = "mole"
BASE_ARTIFACT = "base"
BASE_INFO = "base.json"  # in the bundled base dir: {"kind", "file" (a .gguf name or null), "mb", "source"}
PREDICT_BATCH = 8  # prompts generated together


def load_mole(
    mole_dir: str | Path,
    base_dir: str | Path | None = None,
    *,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load a MoLE model directory, on the bundled base when ``base_dir`` is given, else on its base reference.

    Args:
        mole_dir: a directory written by ``MoLEModel.save_pretrained`` (holds mole_config.json).
        base_dir: a bundled base (see flows/registry.py ``bundle_base``); None loads ``base_model`` of
            mole_config.json as ``mole.nn.model.load_spec_base`` resolves it.
        device: where to load; None keeps the spec's device when it is "cpu", else "auto".
        trust_remote_code: the caller's permission for the base's own code (a saved flag alone is refused).

    Returns:
        A ``mole.nn.model.MoLEModel`` in eval mode.
    """
    from mole.nn.model import MoLEModel
    from mole.nn.spec import SPEC_FILE

    mole_dir = Path(mole_dir)
    spec_file = mole_dir / SPEC_FILE
    if not spec_file.exists():
        raise FileNotFoundError(f"{mole_dir}: no {SPEC_FILE}; not a MoLE model directory")
    ref = json.loads(spec_file.read_text(encoding="utf-8"))["base_model"]
    device = device or (ref.get("device") if ref.get("device", "cpu") == "cpu" else "auto")
    if base_dir is None or not (Path(base_dir) / BASE_INFO).exists():
        return MoLEModel.from_pretrained(mole_dir, device=device, trust_remote_code=trust_remote_code)
    from mole.base import load_base
    from mole.trust import remote_code

    info = json.loads((Path(base_dir) / BASE_INFO).read_text(encoding="utf-8"))
    source = Path(base_dir) / info["file"] if info.get("file") else Path(base_dir)
    base, tokenizer = load_base(
        str(source),
        dtype=ref.get("dtype", "float32"),
        device=device,
        trust_remote_code=remote_code(ref.get("trust_remote_code", False), trust_remote_code, spec_file),
    )
    return MoLEModel.from_pretrained(mole_dir, base=base, tokenizer=tokenizer, trust_remote_code=trust_remote_code)


def prompts_of(model_input: Any) -> list[str]:
    """The prompts of a predict input: a DataFrame with a ``prompt`` column, a dict of lists, a list or a str."""
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError(f"predict: expected a 'prompt' column, got columns {list(model_input.columns)}")
        return [str(p) for p in model_input["prompt"].tolist()]
    if isinstance(model_input, dict):
        return prompts_of(pd.DataFrame(model_input))
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, list | tuple | pd.Series):
        return [str(p) for p in model_input]
    raise TypeError(f"predict: expected a DataFrame with a 'prompt' column, got {type(model_input).__name__}")


def generation_kwargs(params: dict[str, Any] | None) -> dict[str, Any]:
    """``generate_text`` options from the pyfunc params: greedy at temperature 0, sampling above it."""
    params = params or {}
    max_new = int(params.get("max_new_tokens", 16))
    temperature = float(params.get("temperature", 0.0))
    if max_new < 1:
        raise ValueError(f"predict: params.max_new_tokens must be >= 1, got {max_new}")
    if temperature < 0:
        raise ValueError(f"predict: params.temperature must be >= 0, got {temperature}")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "raw": bool(params.get("raw", False))}
    if temperature > 0:
        kwargs |= {"do_sample": True, "temperature": temperature}
    return kwargs


class MoLEPyfunc(PythonModel):
    """pyfunc wrapper: ``predict(DataFrame[prompt], params={max_new_tokens, temperature, raw}) -> list[str]``.

    Prompts get the training prompts' ending (e.g. "\nAnswer:") unless ``raw`` is true. With ``return_routing``
    true, each row's answer is instead a dict: its completion and the routing of every token of prompt and
    completion (``mole.routing.explain.Explanation.to_dict``: tokens, experts, per-token weights per expert).
    """

    def load_context(self, context: Any) -> None:
        """Load the MoLE model from the logged artifacts (the bundled base when there is one).

        Remote code runs only when the model config says so: set at log time from the building user's own
        ``base_model.trust_remote_code``, or at load time (``load_model(uri, model_config=...)``).
        """
        artifacts = context.artifacts
        allow = bool((getattr(context, "model_config", None) or {}).get("trust_remote_code", False))
        self.model = load_mole(artifacts[MOLE_ARTIFACT], artifacts.get(BASE_ARTIFACT), trust_remote_code=allow)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str] | list[dict[str, Any]]:
        """One completion per prompt, in order (with ``return_routing``: one dict per prompt, see the class)."""
        prompts, kwargs = prompts_of(model_input), generation_kwargs(params)
        if bool((params or {}).get("return_routing", False)):
            from mole.routing.explain import explain  # the bundled mole, importable once the model has loaded

            return [e.to_dict() for e in explain(self.model, prompts, **kwargs)]
        out: list[str] = []
        for start in range(0, len(prompts), PREDICT_BATCH):
            out += self.model.generate_text(prompts[start : start + PREDICT_BATCH], **kwargs)
        return out


mlflow.models.set_model(MoLEPyfunc())
