"""The issue-14 arms: the placebo bias (shuffled patch heights), the masked elevation channel, and
how an arm's name reaches the model config through the training script's flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_topoflow import TopoFlowForForecasting, shuffle_patch_heights
from tests.fixtures_model import make_tiny_batch, make_tiny_config, model_for_arm
from topoflow.corpus.worlds import world_terrain
from topoflow.experiment.arms import UnknownArmError, parse_arm


def _world_heights(count: int) -> torch.Tensor:
    """(count, 128) patch-mean heights (patch 2) of distinct terrain worlds."""
    terrains = np.stack([world_terrain(0, i, 16, 32).elevation for i in range(count)])
    patches = terrains.reshape(count, 8, 2, 16, 2).mean(axis=(2, 4))
    return torch.from_numpy(patches.reshape(count, -1))


def test_shuffle_keeps_each_samples_heights_and_destroys_their_placement() -> None:
    heights = _world_heights(32)
    placebo = shuffle_patch_heights(heights, torch.Generator().manual_seed(1))
    # Same values per sample: the height distribution the bias sees is intact ...
    torch.testing.assert_close(placebo.sort(dim=1).values, heights.sort(dim=1).values)
    # ... but the map is gone: which patch is high no longer follows the terrain.
    moved = (placebo != heights).float().mean(dim=1)
    assert (moved > 0.9).all(), moved.min()
    correlation = [np.corrcoef(heights[b], placebo[b])[0, 1] for b in range(len(heights))]
    assert abs(np.mean(correlation)) < 0.1 and np.max(np.abs(correlation)) < 0.5, correlation
    # Each sample gets its own permutation, not one permutation for the batch.
    same = heights[:1].expand(4, -1)
    shuffled = shuffle_patch_heights(same, torch.Generator().manual_seed(1))
    assert len({tuple(row.tolist()) for row in shuffled}) == 4


def _encode(model: TopoFlowForForecasting, batch: dict) -> torch.Tensor:
    """The encoder's tokens (B, N, D): O(1) values, where the fresh head's forecast is O(1e-4)."""
    with torch.no_grad():
        return model.topoflow(batch["fields"], batch["lead_time_hours"]).last_hidden_state


def _pair(**overrides: object) -> tuple[TopoFlowForForecasting, TopoFlowForForecasting]:
    """A model and its placebo twin with the same weights, bias on block 0 with alpha 3."""
    torch.manual_seed(0)
    true = TopoFlowForForecasting(make_tiny_config(elevation_bias_blocks=[0],
                                                   elevation_alpha_init=3.0, **overrides))
    placebo = TopoFlowForForecasting(make_tiny_config(
        elevation_bias_blocks=[0], elevation_alpha_init=3.0, elevation_bias_placebo=True,
        **overrides))  # fmt: skip
    placebo.load_state_dict(true.state_dict())
    return true.eval(), placebo.eval()


def test_placebo_model_sees_the_same_heights_in_another_order() -> None:
    true, placebo = _pair()
    batch = make_tiny_batch(true.config, batch_size=3)
    z_true = true.topoflow._patch_elevation(batch["fields"], None)
    z_placebo = placebo.topoflow._patch_elevation(batch["fields"], None)
    torch.testing.assert_close(z_placebo.sort(dim=1).values, z_true.sort(dim=1).values)
    assert not torch.equal(z_placebo, z_true)
    out_true, out_placebo = _encode(true, batch), _encode(placebo, batch)
    torch.testing.assert_close(_encode(placebo, batch), out_placebo, rtol=0, atol=0)  # repeatable
    assert (out_true - out_placebo).abs().max() > 1e-2  # the shuffle reaches the tokens


def test_placebo_acts_only_through_the_bias() -> None:
    true, placebo = _pair()
    for model in (true, placebo):
        for alpha in model.elevation_alpha_parameters():
            alpha.data.zero_()
    batch = make_tiny_batch(true.config, batch_size=2)
    torch.testing.assert_close(_encode(placebo, batch), _encode(true, batch))


def test_placebo_draws_fresh_permutations_in_training() -> None:
    _, placebo = _pair()
    placebo.train()
    fields = make_tiny_batch(placebo.config, batch_size=2)["fields"]
    torch.manual_seed(0)
    first = placebo.topoflow._patch_elevation(fields, None)
    second = placebo.topoflow._patch_elevation(fields, None)
    assert not torch.equal(first, second)


def _elevation_changed(batch: dict, channel: int) -> dict:
    other = dict(batch)
    other["fields"] = batch["fields"].clone()
    other["fields"][:, channel] = other["fields"][:, channel].flip(-1) + 0.5
    return other


@pytest.mark.parametrize("masked", [False, True])
def test_masked_elevation_channel_hides_the_terrain_from_the_embedding(masked: bool) -> None:
    torch.manual_seed(0)
    model = TopoFlowForForecasting(make_tiny_config(elevation_input_masked=masked)).eval()
    batch = make_tiny_batch(model.config, batch_size=2)
    other = _elevation_changed(batch, model.config.elevation_channel)
    change = (_encode(model, batch) - _encode(model, other)).abs().max()
    assert (change == 0) if masked else (change > 1e-2)


def test_masked_channel_still_feeds_the_bias() -> None:
    torch.manual_seed(0)
    config = make_tiny_config(elevation_input_masked=True, elevation_bias_blocks=[0],
                              elevation_alpha_init=3.0)  # fmt: skip
    model = TopoFlowForForecasting(config).eval()
    batch = make_tiny_batch(config, batch_size=2)
    other = _elevation_changed(batch, config.elevation_channel)
    assert (_encode(model, batch) - _encode(model, other)).abs().max() > 1e-2


def test_flags_are_validated_and_saved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="elevation_bias_placebo"):
        make_tiny_config(elevation_bias_placebo="yes")
    with pytest.raises(ValueError, match="elevation_input_masked"):
        make_tiny_config(elevation_input_masked=True, elevation_variable=None)
    model = TopoFlowForForecasting(make_tiny_config(elevation_bias_blocks=[0],
                                                    elevation_bias_placebo=True,
                                                    elevation_input_masked=True))  # fmt: skip
    model.save_pretrained(tmp_path)
    loaded = TopoFlowForForecasting.from_pretrained(tmp_path)
    assert loaded.config.elevation_bias_placebo and loaded.config.elevation_input_masked


@pytest.mark.parametrize("arm, placebo, masked, direction, blocks", [
    ("placebo", True, False, "upslope", [0]),
    ("upslope-bias-only", False, True, "upslope", [0]),
    ("control-no-elevation", False, True, "downslope", []),
    ("upslope", False, False, "upslope", [0]),
    ("sham:blocks=1;direction=downslope;placebo=true;mask_input=yes", True, True, "downslope", [1]),
])
def test_arm_flags_reach_the_model_config(
    synthetic_corpus: Path, tmp_path: Path, arm: str, placebo: bool, masked: bool,
    direction: str, blocks: list[int],
) -> None:
    model = model_for_arm(arm, synthetic_corpus, tmp_path)
    config = model.config
    assert (config.elevation_bias_placebo, config.elevation_input_masked) == (placebo, masked)
    assert config.elevation_bias_direction == direction and config.elevation_bias_blocks == blocks


def test_bad_arm_flags_are_refused() -> None:
    with pytest.raises(UnknownArmError, match="placebo must be true or false"):
        parse_arm("x:blocks=0;placebo=maybe")
    with pytest.raises(ValueError, match="a placebo needs bias blocks"):
        parse_arm("x:blocks=none;placebo=true")
