"""Golden-output regression of the shipped topoflow-base, loaded offline on a fresh cache
(scripts/make_golden.py records tests/data/topoflow_base_golden.safetensors)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.fixtures_hub import tiny_forecaster
from topoflow.safety import read_manifest, save_model_folder, write_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN = REPO_ROOT / "tests" / "data" / "topoflow_base_golden.safetensors"
PACKAGED = REPO_ROOT / "topoflow" / "pretrained" / "topoflow-base"
# Same machine class as the recording, possibly another CPU or thread count: fp32 reductions may
# reorder, nothing more. A changed weight or attention path moves forecasts far beyond this.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _load_make_golden():
    spec = importlib.util.spec_from_file_location(
        "make_golden", REPO_ROOT / "scripts" / "make_golden.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FORECAST_OFFLINE = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from topoflow import TopoFlowForForecasting
    golden = load_file(sys.argv[1])
    model = TopoFlowForForecasting.from_pretrained("topoflow-base").eval()
    with torch.no_grad():
        forecast = model(golden["fields"], golden["lead_time_hours"],
                         time_features=golden.get("time_features")).forecast
    save_file({"forecast": forecast.contiguous()}, sys.argv[2])
    """
)


def test_packaged_topoflow_base_matches_the_golden_output_offline(tmp_path: Path) -> None:
    if not GOLDEN.is_file():
        pytest.fail(
            f"{GOLDEN.relative_to(REPO_ROOT)} is missing: ship topoflow/pretrained/topoflow-base, "
            "then run `HF_HUB_OFFLINE=1 python scripts/make_golden.py` and commit the file"
        )
    with safe_open(str(GOLDEN), framework="pt") as handle:
        recorded_sha = handle.metadata()["weights_sha256"]
    shipped_sha = read_manifest(PACKAGED)["model.safetensors"]
    assert shipped_sha == recorded_sha, (
        "topoflow-base weights changed since the golden output was recorded; if intended, rerun "
        "`HF_HUB_OFFLINE=1 python scripts/make_golden.py`"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "forecast.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", _FORECAST_OFFLINE, str(GOLDEN), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    forecast, golden = load_file(out)["forecast"], load_file(GOLDEN)["forecast"]
    assert torch.isfinite(golden).all()
    torch.testing.assert_close(forecast, golden, **TOLERANCE)


def test_golden_recording_round_trips_and_catches_a_changed_weight(tmp_path: Path) -> None:
    make_golden = _load_make_golden()
    model = tiny_forecaster(seed=4)
    folder = save_model_folder(model, tmp_path / "model")
    golden_path = make_golden.record_golden(str(folder), tmp_path / "golden.safetensors")
    golden = load_file(golden_path)
    assert golden["fields"].shape[0] == len(model.config.lead_times_hours)
    # The inputs need no random generator: recording twice gives the same bytes.
    again = make_golden.golden_inputs(model.config)
    assert torch.equal(again["fields"], golden["fields"])
    reloaded = type(model).from_pretrained(folder)
    torch.testing.assert_close(
        make_golden.golden_forecast(reloaded, golden), golden["forecast"], **TOLERANCE
    )
    # One head weight moved by 1e-2 must fail the comparison.
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("head.2.weight"))
    weights[key] += 1e-2
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    write_manifest(folder)  # a deliberate change: the manifest is rewritten with it
    changed = type(model).from_pretrained(folder)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            make_golden.golden_forecast(changed, golden), golden["forecast"], **TOLERANCE
        )
