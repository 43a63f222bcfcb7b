"""TopoFlow paper code (AmmarKheder/TopoFlow) -> TopoFlow conversion, against the self-written
reference of that code's forward (tests/reference_climax.py): the baseline layout converts exactly,
its elevation bias means the same in metres, and what cannot convert exactly is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config
from tests.reference_climax import paper_forward, paper_state_dict
from topoflow.convert_climax import convert_climax_checkpoint, convert_climax_state_dict, main


def elevation_config(**overrides):
    """The tiny config with elevation statistics that are not the identity (mean 1200, std 1500 m),
    so a mapping that forgot the normalization would show."""
    config = make_tiny_config(**overrides)
    config.variable_mean["elevation"], config.variable_std["elevation"] = 1200.0, 1500.0
    return config


def paper_hparams(config, wind_scan: bool | None = False) -> dict:
    model = {"img_size": list(config.img_size), "patch_size": config.patch_size,
             "use_physics_mask": False}  # fmt: skip
    if wind_scan is not None:
        model["parallel_patch_embed"] = wind_scan
    return {"config": {"model": model, "data": {"variables": list(config.variables)}}}


def save_checkpoint(path, checkpoint, hparams=None):
    saved = {"state_dict": checkpoint, "epoch": 7, "global_step": 1890}
    if hparams is not None:
        saved["hyper_parameters"] = hparams
    torch.save(saved, path)


def forecast(model, batch):
    with torch.no_grad():
        return model.eval()(batch["fields"], batch["lead_time_hours"]).forecast


def test_paper_baseline_converts_exactly(tmp_path):
    config = elevation_config()
    checkpoint = paper_state_dict(config)
    save_checkpoint(tmp_path / "paper.ckpt", checkpoint, paper_hparams(config))
    (tmp_path / "config.json").write_text(json.dumps(config.to_diff_dict()))

    main([str(tmp_path / "paper.ckpt"), str(tmp_path / "out"), "--config",
          str(tmp_path / "config.json")])  # fmt: skip

    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["layout"] == "topoflow-paper"
    assert report["unmapped"] == [] and report["missing"] == [] and report["from_config"] == {}
    assert set(report["dropped"]) == {"china_mask"}
    assert "loss mask" in report["dropped"]["china_mask"]
    assert report["renamed"] == {
        "patch_embed.proj_weights": "token_embeds.proj_weights",
        "patch_embed.proj_biases": "token_embeds.proj_biases",
        "patch_embed.norm.weight": "patch_embed_norm.weight",
        "patch_embed.norm.bias": "patch_embed_norm.bias",
    }
    assert report["mapped"]["patch_embed.norm.bias"] == "topoflow.embeddings.patch_embed_norm.bias"
    assert report["config_fields"] == {"lead_time_scale_hours": 1.0, "patch_embed_norm": True}
    sources = {key.removeprefix("model.") for key in checkpoint}
    assert set(report["mapped"]) | set(report["dropped"]) == sources

    model, info = TopoFlowForForecasting.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.lead_time_scale_hours == 1.0 and model.config.patch_embed_norm
    batch = make_tiny_batch(config)
    ours = forecast(model, batch)
    reference = paper_forward(checkpoint, config, batch["fields"], batch["lead_time_hours"])
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert ours.abs().mean() > 1e-2


@pytest.mark.parametrize("field, value", [("lead_time_scale_hours", 100.0),
                                          ("patch_embed_norm", False)])  # fmt: skip
def test_each_paper_difference_matters(field, value):
    """The reference would catch a converter that ignored the lead-time scale or the LayerNorm."""
    config = elevation_config()
    checkpoint = paper_state_dict(config)
    converted, converted_config, _ = convert_climax_state_dict(
        {key.removeprefix("model."): v for key, v in checkpoint.items()}, config, wind_scan=False
    )
    setattr(converted_config, field, value)
    model = TopoFlowForForecasting(converted_config)
    model.load_state_dict(converted, strict=False)
    batch = make_tiny_batch(config)
    reference = paper_forward(checkpoint, config, batch["fields"], batch["lead_time_hours"])
    assert (forecast(model, batch) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("h_scale", [1000.0, 250.0])
def test_paper_alpha_on_normalized_elevation_means_the_same_bias_in_metres(h_scale):
    config = elevation_config(elevation_scale=h_scale)
    checkpoint = paper_state_dict(config, alpha=1500.0)
    state = {key.removeprefix("model."): value for key, value in checkpoint.items()}
    converted, converted_config, report = convert_climax_state_dict(state, config, wind_scan=False)

    # alpha_paper * H_scale / (1000 * std): 1500 * H_scale / (1000 * 1500 m)
    alpha = converted["topoflow.blocks.0.attn.elevation_alpha"]
    assert alpha.shape == () and alpha.item() == pytest.approx(h_scale / 1000.0)
    assert report.mapped["blocks.0.attn.alpha"] == "topoflow.blocks.0.attn.elevation_alpha"
    assert report.renamed["blocks.0.attn.alpha"] == "blocks.0.attn.elevation_alpha"
    assert any("normalized elevation" in note for note in report.notes)
    assert converted_config.elevation_bias_blocks == [0]
    assert converted_config.elevation_bias_direction == "downslope"
    assert list(report.from_config) == ["topoflow.blocks.0.attn.H_scale"] and not report.missing

    model = TopoFlowForForecasting(converted_config)
    model.load_state_dict(converted, strict=True)
    batch = make_tiny_batch(config)
    ours = forecast(model, batch)
    reference = paper_forward(checkpoint, config, batch["fields"], batch["lead_time_hours"])
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    without_bias = dict(checkpoint, **{"model.blocks.0.attn.alpha": torch.zeros(1)})
    unbiased = paper_forward(without_bias, config, batch["fields"], batch["lead_time_hours"])
    assert (reference - unbiased).abs().max() > 1e-2  # the bias is not a no-op here


def test_relative_position_bias_is_refused_naming_the_key(tmp_path):
    config = elevation_config()
    checkpoint = paper_state_dict(config, alpha=2.0)
    checkpoint["model.blocks.0.attn.rel_pos_bias.bias_table"] = torch.randn(32 * 32, 4)
    save_checkpoint(tmp_path / "full.ckpt", checkpoint, paper_hparams(config))
    with pytest.raises(ValueError, match=r"rel_pos_bias\.bias_table.*relative position bias"):
        convert_climax_checkpoint(tmp_path / "full.ckpt", tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "recorded, flag, message",
    [
        (True, None, "trained with the wind scan"),
        (None, None, "trained with the wind scan"),  # no parallel_patch_embed: true upstream
        ("absent", None, "does not record whether its wind scan.*--paper-wind-scan off"),
        (False, True, "contradicts"),
        ("absent", True, "trained with the wind scan"),
    ],
)
def test_wind_scan_is_refused_or_must_be_declared(tmp_path, recorded, flag, message):
    config = elevation_config()
    hparams = None if recorded == "absent" else paper_hparams(config, wind_scan=recorded)
    save_checkpoint(tmp_path / "paper.ckpt", paper_state_dict(config), hparams)
    with pytest.raises(ValueError, match=message):
        convert_climax_checkpoint(tmp_path / "paper.ckpt", tmp_path / "out", config, wind_scan=flag)


def test_a_bare_state_dict_converts_once_the_wind_scan_is_declared_off(tmp_path):
    config = elevation_config()
    save_checkpoint(tmp_path / "paper.ckpt", paper_state_dict(config))
    (tmp_path / "config.json").write_text(json.dumps(config.to_diff_dict()))
    argv = [str(tmp_path / "paper.ckpt"), str(tmp_path / "out"), "--paper-wind-scan", "off",
            "--config", str(tmp_path / "config.json")]  # fmt: skip
    assert main(argv) == 0
    assert TopoFlowForForecasting.from_pretrained(tmp_path / "out").config.patch_embed_norm


def test_mixed_layouts_are_refused():
    config = elevation_config()
    state = {key.removeprefix("model."): value for key, value in paper_state_dict(config).items()}
    state["token_embeds.0.proj.weight"] = torch.zeros(config.embed_dim, 1, 2, 2)
    with pytest.raises(ValueError, match="neither layout"):
        convert_climax_state_dict(state, config, wind_scan=False)
