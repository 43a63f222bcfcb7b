"""Pytest fixtures for the model (see tests/conftest.py).

`tiny_config`: the 15 default variables on a 16 x 32 grid, patch 2, embed 32, depth 4, 4 heads, no
dropout, baseline (no bias blocks); a forward pass takes milliseconds. `tiny_batch`: a batch of two
samples following docs/CONTRACTS.md section 1 for `tiny_config` (NaN labels and a region mask
included). The plain functions `make_tiny_config` / `make_tiny_batch` build variants.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from configuration_topoflow import TopoFlowConfig

__all__ = [
    "TINY_IMG_SIZE",
    "make_terrain",
    "make_tiny_batch",
    "make_tiny_config",
    "tiny_batch",
    "tiny_config",
]

TINY_IMG_SIZE = (16, 32)


def make_tiny_config(**overrides: Any) -> TopoFlowConfig:
    """The tiny test config; keyword arguments override any field."""
    fields: dict[str, Any] = dict(
        img_size=TINY_IMG_SIZE,
        patch_size=2,
        embed_dim=32,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        decoder_depth=2,
        drop_path=0.0,
        drop_rate=0.0,
    )
    fields.update(overrides)
    return TopoFlowConfig(**fields)


def make_terrain(height: int, width: int) -> torch.Tensor:
    """(H, W) elevation in metres: a 4000 m plateau in the west falling to a coastal plain."""
    cols = torch.linspace(0.0, 1.0, width)
    rows = torch.linspace(0.0, 1.0, height)
    plateau = 4000.0 * torch.sigmoid((0.35 - cols) * 20.0)  # (W,)
    hills = 300.0 * torch.sin(rows[:, None] * math.pi * 3) * torch.cos(cols[None, :] * math.pi * 5)
    return (plateau[None, :] + hills).clamp(min=0.0)


def make_tiny_batch(config: TopoFlowConfig, batch_size: int = 2, seed: int = 0) -> dict[str, Any]:
    """A batch for `config` as the loader yields it: normalized fields (the elevation channel, if
    any, normalized with the config statistics), NaN holes in the labels, a region mask."""
    generator = torch.Generator().manual_seed(seed)
    height, width = config.img_size
    fields = torch.randn(batch_size, len(config.variables), height, width, generator=generator)
    channel = config.elevation_channel
    if channel is not None:
        name = config.variables[channel]
        terrain = make_terrain(height, width)
        normalized = (terrain - config.variable_mean[name]) / config.variable_std[name]
        fields[:, channel] = normalized
    labels = torch.randn(
        batch_size, len(config.target_variables), height, width, generator=generator
    )
    labels[:, :, :2, :3] = float("nan")  # missing values in a corner
    region_mask = torch.ones(batch_size, height, width, dtype=torch.bool)
    region_mask[:, -3:, :] = False  # "sea" rows outside the region
    init_hours = torch.arange(batch_size, dtype=torch.int64) * 6 + 394_464  # 2015-01-01T00 UTC
    lead_hours = torch.tensor([12, 24, 48, 96] * batch_size)[:batch_size]
    batch = {
        "fields": fields,
        "lead_time_hours": lead_hours.float(),
        "labels": labels,
        "region_mask": region_mask,
        "sample_ids": init_hours * 1000 + lead_hours,
    }
    if config.time_features:  # derived from the time stamps, as the data pipeline does
        from topoflow.data.time_features import encode_time_features

        batch["time_features"] = torch.stack([
            torch.from_numpy(encode_time_features(config.time_features, int(hour), int(lead)))
            for hour, lead in zip(init_hours, lead_hours, strict=True)
        ])  # fmt: skip
    return batch


@pytest.fixture
def tiny_config() -> TopoFlowConfig:
    return make_tiny_config()


@pytest.fixture
def tiny_batch(tiny_config: TopoFlowConfig) -> dict[str, Any]:
    return make_tiny_batch(tiny_config)


def model_for_arm(arm: str, corpus: Any, folder: Any) -> Any:
    """The model `train_accelerate.py --from-scratch` builds for an experiment arm (name or spec),
    from a tiny preset written to `folder`, on the metadata of `corpus`: what an arm's flags
    really set in the config."""
    import train_accelerate
    from topoflow.corpus.schema import CorpusMetadata
    from topoflow.experiment.arms import parse_arm
    from topoflow.training.args import parse_args

    config_file = folder / "config.json"
    config_file.write_text('{"patch_size": 2, "embed_dim": 8, "depth": 2, "num_heads": 2}')
    args = parse_args(["--from-scratch", "--config", str(config_file),
                       *parse_arm(arm).train_args()])  # fmt: skip
    model, _, _ = train_accelerate.load_model(args, CorpusMetadata.load(corpus), None)
    return model
