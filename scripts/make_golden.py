"""Record the golden forecasts of the packaged topoflow-base for tests/test_hub_golden.py.

    HF_HUB_OFFLINE=1 python scripts/make_golden.py

Run it once after shipping (or deliberately retraining) topoflow/pretrained/topoflow-base, and
commit tests/data/topoflow_base_golden.safetensors. The file stores the inputs as well as the
forecasts, so the test does not depend on a random generator staying the same across torch
releases, and the sha256 of the weights it was recorded with, so a retrained model without new
golden outputs fails with a message that says so instead of a wall of numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from topoflow import TopoFlowForForecasting  # noqa: E402 (needs the repo on sys.path)
from topoflow.data.time_features import encode_time_features  # noqa: E402
from topoflow.hub import resolve_pretrained_path  # noqa: E402
from topoflow.safety import read_manifest  # noqa: E402

__all__ = ["GOLDEN_PATH", "golden_inputs", "golden_forecast", "record_golden", "main"]

GOLDEN_PATH = REPO_ROOT / "tests" / "data" / "topoflow_base_golden.safetensors"


def golden_inputs(config) -> dict[str, torch.Tensor]:
    """A deterministic batch without any random generator: one sample per configured lead time,
    smooth normalized fields (a different phase per variable and sample) of about unit size."""
    height, width = config.img_size
    leads = [float(h) for h in config.lead_times_hours]
    rows = torch.linspace(0.0, 1.0, height, dtype=torch.float64)[:, None]
    cols = torch.linspace(0.0, 1.0, width, dtype=torch.float64)[None, :]
    samples = []
    for sample in range(len(leads)):
        channels = []
        for variable in range(len(config.variables)):
            phase = 0.7 * variable + 1.3 * sample
            field = torch.sin(2 * math.pi * (rows * (1 + variable % 3) + phase)) * torch.cos(
                2 * math.pi * (cols * (1 + sample % 2) - 0.5 * phase)
            )
            channels.append(field)
        samples.append(torch.stack(channels))
    inputs = {
        "fields": torch.stack(samples).float().contiguous(),  # (B, V, H, W)
        "lead_time_hours": torch.tensor(leads, dtype=torch.float32),  # (B,)
    }
    if config.time_features:  # the calendar of 2018-01-01T00 UTC + 30 h per sample
        inputs["time_features"] = torch.stack([
            torch.from_numpy(encode_time_features(config.time_features, 420_768 + 30 * k, int(h)))
            for k, h in enumerate(leads)
        ]).contiguous()  # (B, 2 * len(time_features))
    return inputs


@torch.no_grad()
def golden_forecast(model: TopoFlowForForecasting, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, V_out, H, W) normalized forecast of `model` in eval mode."""
    return model.eval()(
        inputs["fields"], inputs["lead_time_hours"], time_features=inputs.get("time_features")
    ).forecast.contiguous()


def weights_sha256(name_or_path: str) -> str:
    """The model.safetensors digest from the model folder's SHA256SUMS."""
    return read_manifest(resolve_pretrained_path(name_or_path))["model.safetensors"]


def record_golden(name_or_path: str, out: Path) -> Path:
    """Load `name_or_path` the way users do and write inputs, forecast and provenance to `out`."""
    model = TopoFlowForForecasting.from_pretrained(name_or_path)
    inputs = golden_inputs(model.config)
    forecast = golden_forecast(model, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "model": name_or_path,
        "weights_sha256": weights_sha256(name_or_path),
        "torch": torch.__version__,
        "attn_implementation": str(model.config._attn_implementation),
        "recorded_by": "scripts/make_golden.py",
    }
    save_file({**inputs, "forecast": forecast}, out, metadata=metadata)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="topoflow-base", help="short name or model folder")
    parser.add_argument("--out", type=Path, default=GOLDEN_PATH)
    args = parser.parse_args(argv)
    path = record_golden(args.model, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
