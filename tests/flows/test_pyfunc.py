"""The pyfunc's routing audit (params.return_routing) on a tiny model dir, no tracking server: the python model class
directly, then the model saved and loaded through MLflow with the registered signature."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from typer.testing import CliRunner

from mole.config import BuildConfig
from mole.nn.model import MoLEModel
from mole.routing.explain import explain

PROMPTS = ["Reverse the word: cat", "Add 2 and 3."]


def test_return_routing_gives_each_row_its_completion_and_routing(tiny_mole_dir: Path) -> None:
    from flows.pyfunc import MoLEPyfunc

    pyfunc = MoLEPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"mole": str(tiny_mole_dir)}, model_config={}))
    frame = pd.DataFrame({"prompt": PROMPTS})
    plain = pyfunc.predict(None, frame, params={"max_new_tokens": 4})
    assert plain == pyfunc.model.generate_text(PROMPTS, max_new_tokens=4)  # the default output is unchanged
    rows = pyfunc.predict(None, frame, params={"max_new_tokens": 4, "return_routing": True})
    want = explain(MoLEModel.from_pretrained(tiny_mole_dir), PROMPTS, max_new_tokens=4)
    assert rows == [e.to_dict() for e in want]
    assert [r["completion"] for r in rows] == plain
    for row in rows:
        assert row["experts"] == ["add", "reverse", "units"] and len(row["weights"]) == len(row["tokens"])
        assert len(row["tokens"]) > row["n_prompt"] and all(len(w) == 3 for w in row["weights"])
    raw = pyfunc.predict(None, "Add 2 and 3.", params={"max_new_tokens": 2, "return_routing": True, "raw": True})
    assert raw[0]["prompt"] == "Add 2 and 3."


def test_the_signature_lets_return_routing_through_mlflow(
    tiny_mole_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from flows.packaging import PYFUNC_FILE, load_model, signature
    from mole.cli import app

    monkeypatch.chdir(tmp_path)
    params = {p.name: p for p in signature(BuildConfig()).params.params}
    assert params["return_routing"].dtype.name == "boolean" and params["return_routing"].default is False
    path = tmp_path / "model"  # MLflow drops a param its signature lacks: this checks the one that gets registered
    mlflow.pyfunc.save_model(str(path), python_model=str(PYFUNC_FILE), artifacts={"mole": str(tiny_mole_dir)},
                             signature=signature(BuildConfig()))  # fmt: skip
    loaded = mlflow.pyfunc.load_model(str(path))
    frame = pd.DataFrame({"prompt": PROMPTS[:1]})
    (row,) = loaded.predict(frame, params={"max_new_tokens": 3, "return_routing": True})
    assert isinstance(row, dict) and row["completion"] == loaded.predict(frame, params={"max_new_tokens": 3})[0]
    # mole explain takes an MLflow model as predict does: the MoLE model behind its pyfunc.
    assert isinstance(load_model(str(path)), MoLEModel)
    res = CliRunner().invoke(app, ["explain", "-m", str(path), "--prompt", PROMPTS[0], "--max-new-tokens", "3",
                                   "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [row]
