"""The oracle arm of issue 14 (config.elevation_bias_rise="path"): the bias from the total ascent
along the segment between two patch centres, its placebo, and how the arm reaches the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from attention_topoflow import oriented_ascent, path_ascent_matrix
from modeling_topoflow import TopoFlowForForecasting, patch_mean_elevation, shuffle_patch_pairs
from tests.fixtures_model import make_tiny_batch, make_tiny_config, model_for_arm
from topoflow.corpus.worlds import world_terrain
from topoflow.experiment.arms import parse_arm
from topoflow.figures import path_bias_row


def test_a_ridge_between_two_low_patches_costs_its_height_both_ways() -> None:
    # 2 x 12 cells, patch 2: six patches in a row, a 1000 m ridge on cell columns 5 and 6.
    terrain = torch.zeros(1, 2, 12)
    terrain[0, :, 5:7] = 1000.0
    ascent = path_ascent_matrix(terrain, 2)[0]
    # Patches 0 and 5 are both at 0 m: the endpoint bias sees no rise, the path climbs 1000 m.
    heights = patch_mean_elevation(terrain, 2)[0]
    assert heights[0] == heights[5] == 0.0
    assert ascent[5, 0].item() == pytest.approx(1000.0, abs=0.01)  # source 0 -> receiver 5
    assert ascent[0, 5].item() == pytest.approx(1000.0, abs=0.01)  # and back
    # Patch 2's centre (cell column 4.5) sits halfway up the ridge's flank.
    assert ascent[2, 0].item() == pytest.approx(500.0, abs=0.01)
    assert ascent[0, 2].item() == pytest.approx(0.0, abs=0.01)  # from there it is all downhill
    assert torch.diagonal(ascent).abs().max() == 0


def test_on_a_terrain_that_only_rises_the_path_ascent_is_the_endpoint_rise() -> None:
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(12.0), indexing="ij")
    terrain = (50.0 * rows + 100.0 * cols)[None]  # a plane: patch means = centre heights
    ascent = path_ascent_matrix(terrain, 2)[0]
    heights = patch_mean_elevation(terrain, 2)[0]
    endpoint = torch.relu(heights[:, None] - heights[None, :])  # receiver i above source j
    torch.testing.assert_close(ascent, endpoint, atol=0.01, rtol=0)


def test_path_ascent_against_a_finer_walk_of_the_bilinear_terrain() -> None:
    """The coarse walk's points are every 10th of a fine walk's (scipy's bilinear interpolation at
    cell centres), so its ascent can only miss climbs, never add any: a wrong sample position
    (an off-by-half-cell centre, swapped axes) breaks the bound."""
    terrain = np.stack([world_terrain(0, index, 16, 32).elevation for index in range(2)])
    ascent = path_ascent_matrix(torch.from_numpy(terrain).float(), 2).numpy()
    patch, width = 2, 16
    centres = [((r + 0.5) * patch - 0.5, (c + 0.5) * patch - 0.5)
               for r in range(8) for c in range(width)]
    longest = np.hypot(patch * 7, patch * (width - 1))
    fine_steps = 10 * int(np.ceil(2 * longest))
    fraction = np.linspace(0.0, 1.0, fine_steps + 1)
    rng = np.random.default_rng(0)
    compared = []
    for world in range(2):
        for receiver, source in rng.integers(0, len(centres), size=(60, 2)):
            (r_i, c_i), (r_j, c_j) = centres[receiver], centres[source]
            path = [r_j + fraction * (r_i - r_j), c_j + fraction * (c_i - c_j)]
            profile = map_coordinates(terrain[world].astype(np.float64), path, order=1)
            fine = np.maximum(np.diff(profile), 0.0).sum()
            coarse = ascent[world, receiver, source]
            assert coarse <= fine + 0.05, (world, receiver, source, coarse, fine)
            compared.append((coarse, fine))
    coarse, fine = np.array(compared).T
    assert fine.max() > 1000.0  # the sample pairs do cross real relief
    assert coarse.sum() >= 0.95 * fine.sum()


def test_downslope_reads_the_climb_from_the_receiver_to_the_source() -> None:
    ascent = path_ascent_matrix(torch.rand(2, 4, 6) * 1000.0, 2)
    assert torch.equal(oriented_ascent(ascent, "upslope"), ascent)
    assert torch.equal(oriented_ascent(ascent, "downslope"), ascent.transpose(1, 2))
    with pytest.raises(ValueError, match="elevation_bias_direction"):
        oriented_ascent(ascent, "sideways")


def test_pair_placebo_keeps_every_value_and_loses_the_geography() -> None:
    terrain = np.stack([world_terrain(0, index, 16, 32).elevation for index in range(4)])
    ascent = path_ascent_matrix(torch.from_numpy(terrain).float(), 2)
    placebo = shuffle_patch_pairs(ascent, torch.Generator().manual_seed(1))
    torch.testing.assert_close(placebo.flatten(1).sort(dim=1).values,
                               ascent.flatten(1).sort(dim=1).values)
    # One permutation on both axes: each patch's row of ascents moves with it, whole.
    torch.testing.assert_close(placebo.sort(dim=2).values.sort(dim=1).values,
                               ascent.sort(dim=2).values.sort(dim=1).values)
    assert torch.diagonal(placebo, dim1=1, dim2=2).abs().max() == 0
    correlation = [np.corrcoef(ascent[b].flatten(), placebo[b].flatten())[0, 1] for b in range(4)]
    assert max(correlation) < 0.5, correlation


def _path_model(alpha: float, **overrides: object) -> TopoFlowForForecasting:
    torch.manual_seed(0)
    config = make_tiny_config(elevation_bias_blocks=[0], elevation_alpha_init=alpha,
                              elevation_bias_rise="path", elevation_bias_direction="upslope",
                              **overrides)  # fmt: skip
    return TopoFlowForForecasting(config).eval()


def _encode(model: TopoFlowForForecasting, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.topoflow(batch["fields"], batch["lead_time_hours"]).last_hidden_state


def test_path_bias_at_alpha_zero_is_the_unbiased_model_and_acts_above_it() -> None:
    torch.manual_seed(0)
    plain = TopoFlowForForecasting(make_tiny_config()).eval()
    oracle = _path_model(0.0)
    missing = oracle.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["topoflow.blocks.0.attn.H_scale",
                               "topoflow.blocks.0.attn.elevation_alpha"]
    batch = make_tiny_batch(plain.config, batch_size=2)
    torch.testing.assert_close(_encode(oracle, batch), _encode(plain, batch))
    oracle.topoflow.blocks[0].attn.elevation_alpha.data.fill_(3.0)
    assert (_encode(oracle, batch) - _encode(plain, batch)).abs().max() > 1e-2


def test_every_attention_implementation_applies_the_same_path_bias() -> None:
    batch = make_tiny_batch(make_tiny_config(), batch_size=2)
    outputs = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        model = _path_model(3.0)
        model.set_attn_implementation(implementation)
        outputs[implementation] = _encode(model, batch)
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["flex_attention"], outputs["eager"], atol=1e-5, rtol=1e-5)
    # output_attentions goes through transformers' interface: the probabilities must carry the
    # bias too (a receiver high above its sources attends less to them).
    model = _path_model(3.0)
    with torch.no_grad():
        weights = model.topoflow(batch["fields"], batch["lead_time_hours"],
                                 output_attentions=True).attentions[0]
    plain = _path_model(0.0)
    with torch.no_grad():
        unbiased = plain.topoflow(batch["fields"], batch["lead_time_hours"],
                                  output_attentions=True).attentions[0]
    ascent = model.topoflow._patch_elevation(batch["fields"], None)
    blocked = (ascent > 500.0)[:, None].expand_as(weights)
    assert (weights[blocked] < unbiased[blocked]).float().mean() > 0.95


def test_alpha_learns_through_the_path_bias() -> None:
    model = _path_model(0.0)
    model.train()
    batch = make_tiny_batch(model.config, batch_size=2)
    model(**{k: batch[k] for k in ("fields", "lead_time_hours", "labels")}).loss.backward()
    alpha = model.topoflow.blocks[0].attn.elevation_alpha
    assert alpha.grad is not None and alpha.grad.abs() > 0


def test_the_oracle_placebo_model_permutes_the_matrix_repeatably_in_evaluation() -> None:
    oracle, placebo = _path_model(3.0), _path_model(3.0, elevation_bias_placebo=True)
    fields = make_tiny_batch(oracle.config, batch_size=2)["fields"]
    true = oracle.topoflow._patch_elevation(fields, None)
    shuffled = placebo.topoflow._patch_elevation(fields, None)
    torch.testing.assert_close(shuffled.flatten(1).sort(dim=1).values,
                               true.flatten(1).sort(dim=1).values)
    assert not torch.equal(shuffled, true)
    assert torch.equal(placebo.topoflow._patch_elevation(fields, None), shuffled)


def test_the_rise_is_validated_and_saved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="elevation_bias_rise"):
        make_tiny_config(elevation_bias_rise="ridge")
    _path_model(1.0).save_pretrained(tmp_path)
    assert TopoFlowForForecasting.from_pretrained(tmp_path).config.elevation_bias_rise == "path"


@pytest.mark.parametrize("arm, rise, placebo", [
    ("oracle", "path", False), ("oracle-placebo", "path", True), ("upslope", "endpoint", False),
    ("x:blocks=0;rise=path;direction=downslope", "path", False),
])
def test_the_oracle_arms_reach_the_model_config(
    synthetic_corpus: Path, tmp_path: Path, arm: str, rise: str, placebo: bool,
) -> None:
    model = model_for_arm(arm, synthetic_corpus, tmp_path)
    config = model.config
    assert (config.elevation_bias_rise, config.elevation_bias_placebo) == (rise, placebo)
    with pytest.raises(ValueError, match="rise must be one of"):
        parse_arm("x:blocks=0;rise=ridge")


def test_the_figure_draws_the_oracles_row_from_the_same_ascent() -> None:
    terrain = np.zeros((2, 12))
    terrain[:, 5:7] = 1000.0
    row = path_bias_row(terrain, 2, (0, 5), alpha=2.0, h_scale_m=1000.0, direction="upslope")
    # Receiver 5 pays for the ridge toward source 0 (and toward nothing beyond its own side).
    np.testing.assert_allclose(row, [[-2.0, -2.0, -1.0, 0.0, 0.0, 0.0]], atol=1e-4)
    down = path_bias_row(terrain, 2, (0, 5), alpha=2.0, h_scale_m=1000.0, direction="downslope")
    np.testing.assert_allclose(down, [[-2.0, -2.0, -2.0, -1.0, 0.0, 0.0]], atol=1e-4)
