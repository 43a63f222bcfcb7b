"""ClimaX -> TopoFlow conversion: a ClimaX-layout state dict built here (tests/reference_climax.py)
converts with zero unmapped keys, and the converted model forecasts what ClimaX's forward computes
from the source tensors; a conversion that lacks weights can never load silently."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config
from tests.reference_climax import CLIMAX_VARIABLES, climax_forward, climax_state_dict
from topoflow.convert_climax import (
    convert_climax_checkpoint,
    convert_climax_state_dict,
    load_climax_state_dict,
    main,
)
from topoflow.safety import NonFiniteWeightsError, read_manifest, verify_model_folder
from topoflow.training.model_setup import MissingKeysError, make_loading_report


@pytest.mark.parametrize("grouped", [False, True])
def test_converted_model_forecasts_like_climax(grouped):
    config = make_tiny_config()
    state = climax_state_dict(config, grouped)
    converted, converted_config, report = convert_climax_state_dict(state, config, CLIMAX_VARIABLES)

    assert report.layout == "climax"
    assert report.unmapped == [] and report.missing == [] and report.renamed == {}
    assert report.config_fields == {"lead_time_scale_hours": 100.0, "patch_embed_norm": False}
    assert converted_config.to_dict() == config.to_dict()  # ClimaX's defaults are the defaults
    token_keys = [key for key in state if key.startswith("token_embeds.")]
    expected_dropped = {"token_embeds.0.proj.weight", "token_embeds.0.proj.bias"}  # "t2m"
    assert set(report.dropped) == (set() if grouped else expected_dropped)
    assert set(report.mapped) | set(report.dropped) == set(state)
    assert len(token_keys) == (2 if grouped else 2 * len(CLIMAX_VARIABLES))

    model = TopoFlowForForecasting(config).eval()
    model.load_state_dict(converted, strict=True)
    batch = make_tiny_batch(config)
    with torch.no_grad():
        ours = model(batch["fields"], batch["lead_time_hours"]).forecast
        reference = climax_forward(state, config, batch["fields"], batch["lead_time_hours"])
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert ours.abs().mean() > 1e-2  # not a trivially zero comparison


def test_lightning_checkpoint_to_folder_with_bias_blocks(tmp_path):
    config = make_tiny_config(elevation_bias_blocks=[0])
    state = climax_state_dict(config, grouped=False)
    checkpoint = {
        "epoch": 3,
        "global_step": 810,
        "state_dict": {f"net.{key}": value for key, value in state.items()},
    }
    torch.save(checkpoint, tmp_path / "climax.ckpt")
    assert set(load_climax_state_dict(tmp_path / "climax.ckpt")) == set(state)

    (tmp_path / "config.json").write_text(json.dumps(config.to_diff_dict()))
    argv = [
        str(tmp_path / "climax.ckpt"),
        str(tmp_path / "out"),
        "--config",
        str(tmp_path / "config.json"),
        "--climax-variables",
        ",".join(CLIMAX_VARIABLES),
    ]
    assert main(argv) == 0

    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["unmapped"] == [] and report["missing"] == []
    assert sorted(report["from_config"]) == [
        "topoflow.blocks.0.attn.H_scale",
        "topoflow.blocks.0.attn.elevation_alpha",
    ]
    verify_model_folder(tmp_path / "out")  # SHA256SUMS covers the weights and the report
    assert "conversion_report.json" in read_manifest(tmp_path / "out")
    model, info = TopoFlowForForecasting.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.topoflow.blocks[0].attn.H_scale.item() == 1000.0
    batch = make_tiny_batch(config)
    with torch.no_grad():
        ours = model.eval()(batch["fields"], batch["lead_time_hours"]).forecast
        reference = climax_forward(state, config, batch["fields"], batch["lead_time_hours"])
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)  # alpha_init = 0


def test_released_channel_names_convert_like_var_names():
    config = make_tiny_config()
    state = climax_state_dict(config, grouped=False)
    released = {key.replace("var_", "channel_"): value for key, value in state.items()}
    assert "channel_agg.in_proj_weight" in released  # the names of released ClimaX checkpoints

    converted, _, report = convert_climax_state_dict(released, config, CLIMAX_VARIABLES)
    reference, _, _ = convert_climax_state_dict(state, config, CLIMAX_VARIABLES)

    assert report.unmapped == [] and report.missing == []
    assert report.renamed["channel_embed"] == "var_embed"
    assert report.renamed["channel_agg.out_proj.bias"] == "var_agg.out_proj.bias"
    assert report.mapped["channel_query"] == "topoflow.embeddings.var_query"  # source names
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[key], reference[key]) for key in reference)


def test_unknown_keys_are_always_refused(tmp_path):
    config = make_tiny_config()
    state = climax_state_dict(config, grouped=True)
    state["denormalization.mean"] = torch.zeros(3)
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}}, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="denormalization.mean"):
        convert_climax_checkpoint(tmp_path / "c.ckpt", tmp_path / "out", config, CLIMAX_VARIABLES)
    with pytest.raises(ValueError, match="denormalization.mean"):
        convert_climax_checkpoint(
            tmp_path / "c.ckpt", tmp_path / "out", config, CLIMAX_VARIABLES, allow_missing=True
        )
    assert not (tmp_path / "out").exists()


def test_partial_conversion_never_loads_silently(tmp_path):
    """A source without the variable aggregation: refused, or (allow_missing) written without
    those tensors, so from_pretrained reports them missing and the training guard refuses them."""
    config = make_tiny_config()
    state = climax_state_dict(config, grouped=True)
    dropped = [key for key in state if key.startswith("var_agg.")]
    for key in dropped:
        state.pop(key)
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}}, tmp_path / "c.ckpt")
    missing = sorted(f"topoflow.embeddings.{key}" for key in dropped)

    with pytest.raises(ValueError, match=r"does not provide.*var_agg\.in_proj_weight"):
        convert_climax_checkpoint(tmp_path / "c.ckpt", tmp_path / "out", config, CLIMAX_VARIABLES)
    report = convert_climax_checkpoint(
        tmp_path / "c.ckpt", tmp_path / "out", config, CLIMAX_VARIABLES, allow_missing=True
    )

    assert report.missing == missing
    assert not set(missing) & set(load_file(tmp_path / "out" / "model.safetensors"))
    _, info = TopoFlowForForecasting.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert sorted(info["missing_keys"]) == missing
    with pytest.raises(MissingKeysError, match="var_agg"):
        make_loading_report(info, [], model_name="converted", allow_missing=False)


def test_conversion_without_the_head_cannot_be_loaded(tmp_path):
    config = make_tiny_config()
    state = climax_state_dict(config, grouped=True)
    state = {key: value for key, value in state.items() if not key.startswith("head.0.")}
    torch.save({"state_dict": state}, tmp_path / "c.ckpt")
    report = convert_climax_checkpoint(
        tmp_path / "c.ckpt", tmp_path / "out", config, CLIMAX_VARIABLES, allow_missing=True
    )
    assert report.missing == ["head.0.bias", "head.0.weight"]
    with pytest.raises(ValueError, match=r"head\.0\.(weight|bias)"):
        TopoFlowForForecasting.from_pretrained(tmp_path / "out")


def test_a_non_empty_output_folder_is_never_overwritten(tmp_path):
    config = make_tiny_config()
    torch.save({"state_dict": climax_state_dict(config, grouped=True)}, tmp_path / "c.ckpt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out"):
        convert_climax_checkpoint(tmp_path / "c.ckpt", tmp_path / "out", config, CLIMAX_VARIABLES)
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_non_finite_source_weights_are_refused(tmp_path):
    config = make_tiny_config()
    state = climax_state_dict(config, grouped=True)
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save({"state_dict": state}, tmp_path / "c.ckpt")
    with pytest.raises(NonFiniteWeightsError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        convert_climax_checkpoint(tmp_path / "c.ckpt", tmp_path / "out", config, CLIMAX_VARIABLES)


def test_shape_mismatch_names_the_key():
    config = make_tiny_config()
    state = climax_state_dict(make_tiny_config(depth=4, mlp_ratio=4.0), grouped=True)
    with pytest.raises(ValueError, match=r"mlp\.fc1\.(weight|bias).*mlp_ratio"):
        convert_climax_state_dict(state, config, CLIMAX_VARIABLES)


def test_pickled_code_is_never_loaded(tmp_path):
    torch.save({"state_dict": {"pos_embed": torch.zeros(1)}, "hparams": torch.nn.Linear(1, 1)},
               tmp_path / "unsafe.ckpt")  # fmt: skip
    with pytest.raises(ValueError, match="weights_only=True"):
        load_climax_state_dict(tmp_path / "unsafe.ckpt")
