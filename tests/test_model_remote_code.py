"""A saved folder is a complete Hub model repo: it loads with trust_remote_code=True in a process
where neither the `topoflow` package nor the two Hub modules are importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import topoflow
from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in the subprocess: removes every route to this checkout (sys.path entries, editable-install
# finders), proves the modules are gone and blocks their names, then loads through the Auto classes
# with remote code.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    from pathlib import Path

    repo = Path(sys.argv[1]).resolve()
    folder, out = sys.argv[2], sys.argv[3]

    def outside_repo(entry):
        try:
            return Path(entry or ".").resolve() != repo
        except OSError:
            return True

    sys.path[:] = [entry for entry in sys.path if outside_repo(entry)]
    def not_editable(finder):  # setuptools registers its editable finder as a class
        name = getattr(finder, "__name__", type(finder).__name__)
        return "editable" not in name.lower()

    sys.meta_path[:] = [finder for finder in sys.meta_path if not_editable(finder)]
    for name in ("topoflow", "modeling_topoflow", "configuration_topoflow", "attention_topoflow"):
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        assert origin is None or repo not in origin.parents, f"{name} still imports from {repo}"
        sys.modules[name] = None  # and a regular (non-editable) install cannot serve it either

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForTimeSeriesPrediction

    batch = load_file(os.path.join(out, "batch.safetensors"))
    forecaster = AutoModelForTimeSeriesPrediction.from_pretrained(folder, trust_remote_code=True)
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
    forecaster.eval(), encoder.eval()
    with torch.no_grad():
        forecast = forecaster(**batch).forecast
        tokens = encoder(batch["fields"], batch["lead_time_hours"]).last_hidden_state
    save_file({"forecast": forecast.contiguous(), "tokens": tokens.contiguous()},
              os.path.join(out, "outputs.safetensors"))
    with open(os.path.join(out, "classes.json"), "w") as handle:
        json.dump([type(forecaster).__module__, type(forecaster).__name__,
                   type(encoder).__module__, type(encoder).__name__], handle)
    """
)


@pytest.mark.parametrize("local_auto_class", [False, True])
def test_saved_folder_loads_as_remote_code_without_the_package(tmp_path, local_auto_class):
    config = make_tiny_config(elevation_bias_blocks=[0, 2], elevation_alpha_init=1.5)
    torch.manual_seed(0)
    model = TopoFlowForForecasting(config).eval()
    folder = tmp_path / "topoflow_tiny"
    model.save_pretrained(folder)
    if local_auto_class:  # the same folder through the registered classes, in this process
        model = topoflow.AutoModelForForecasting.from_pretrained(folder).eval()
        assert type(model) is TopoFlowForForecasting
        return

    batch = make_tiny_batch(config)
    batch = {key: value for key, value in batch.items() if key in ("fields", "lead_time_hours")}
    save_file(batch, tmp_path / "batch.safetensors")
    with torch.no_grad():
        expected_forecast = model(**batch).forecast
        expected_tokens = model.topoflow(**batch).last_hidden_state

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO_ROOT), str(folder), str(tmp_path)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes[0].startswith("transformers_modules") and classes[1] == "TopoFlowForForecasting"
    assert classes[2].startswith("transformers_modules") and classes[3] == "TopoFlowModel"
    outputs = load_file(tmp_path / "outputs.safetensors")
    assert torch.equal(outputs["forecast"], expected_forecast)
    assert torch.equal(outputs["tokens"], expected_tokens)
