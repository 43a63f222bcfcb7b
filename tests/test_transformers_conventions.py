"""What a transformers / accelerate user runs first works as transformers' own models do (issue 16):
short names in every Auto class, attention outputs and registered attention functions, torch.export,
offloading device maps, bf16 loading, the standard config names, clear loading errors, and
training progress that suits a log file."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModel,
    AutoModelForTimeSeriesPrediction,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import topoflow
from configuration_topoflow import TopoFlowConfig
from modeling_topoflow import TopoFlowForForecasting, TopoFlowModel
from tests.fixtures_model import make_tiny_batch, make_tiny_config
from topoflow.training.args import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]


def _biased_model(**overrides) -> TopoFlowForForecasting:
    torch.manual_seed(0)
    config = make_tiny_config(elevation_bias_blocks=[0], elevation_alpha_init=2.0, **overrides)
    return TopoFlowForForecasting(config).eval()


# 3. Name resolution


def test_short_name_resolves_in_every_transformers_auto_class(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    packaged = topoflow.TopoFlowForForecasting.from_pretrained("topoflow-base")
    assert isinstance(AutoConfig.from_pretrained("topoflow-base"), TopoFlowConfig)
    forecaster = AutoModelForTimeSeriesPrediction.from_pretrained("topoflow-base")
    encoder = AutoModel.from_pretrained("topoflow-base")
    assert type(forecaster) is TopoFlowForForecasting
    assert type(encoder) is TopoFlowModel
    for name, tensor in packaged.state_dict().items():
        torch.testing.assert_close(forecaster.state_dict()[name], tensor, rtol=0, atol=0)


def test_unknown_name_raises_oserror_as_transformers_does() -> None:
    with pytest.raises(OSError, match="Known names: .*topoflow-base"):
        TopoFlowForForecasting.from_pretrained("topoflow-large")


# 4. Attention API


def test_output_attentions_returns_each_blocks_biased_probabilities() -> None:
    model = _biased_model()
    batch = make_tiny_batch(model.config)
    with torch.no_grad():
        plain = model(**batch)
        out = model(**batch, output_attentions=True)
        model.topoflow.blocks[0].attn.elevation_alpha.fill_(0.0)
        unbiased = model(**batch, output_attentions=True)
    config = model.config
    assert len(out.attentions) == config.depth
    shape = (2, config.num_heads, config.num_patches, config.num_patches)
    for weights in out.attentions:
        assert weights.shape == shape
        torch.testing.assert_close(weights.sum(-1), torch.ones(shape[:-1]))
    torch.testing.assert_close(out.forecast, plain.forecast, rtol=1e-5, atol=1e-5)
    # Block 0's probabilities carry the bias: with alpha = 0 they differ.
    assert (out.attentions[0] - unbiased.attentions[0]).abs().max() > 1e-3
    assert plain.attentions is None


def test_function_registered_with_attention_interface_is_used(monkeypatch) -> None:
    masks = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        masks.append(None if attention_mask is None else tuple(attention_mask.shape))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("topoflow_test_sdpa", recording_sdpa)
    model = _biased_model()
    batch = make_tiny_batch(model.config)
    with torch.no_grad():
        expected = model(**batch).forecast
    model.set_attn_implementation("topoflow_test_sdpa")
    model.train()
    out = model(**batch)
    out.loss.backward()
    tokens = model.config.num_patches
    assert masks == [(2, 1, tokens, tokens)] + [None] * (model.config.depth - 1)
    torch.testing.assert_close(out.forecast, expected, rtol=1e-5, atol=1e-5)
    assert model.topoflow.blocks[0].attn.elevation_alpha.grad != 0


def test_training_script_advertises_only_names_transformers_accepts() -> None:
    (action,) = [a for a in build_parser()._actions if "--attn-implementation" in a.option_strings]
    advertised = re.findall(r"[a-z_]+", action.help.split("(")[0])
    assert advertised == ["eager", "sdpa", "flex_attention"]
    model = _biased_model()
    batch = make_tiny_batch(model.config)
    for name in advertised:
        model.set_attn_implementation(name)
        with torch.no_grad():
            assert torch.isfinite(model(**batch).forecast).all()


# 5. Deployment paths


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_torch_export_with_the_bias_on(dynamic_batch: bool) -> None:
    model = _biased_model()
    example = make_tiny_batch(model.config, batch_size=2)
    batch_dim = torch.export.Dim("batch", min=1, max=64)
    shapes = ({0: batch_dim}, {0: batch_dim}) if dynamic_batch else None
    exported = torch.export.export(
        model, (example["fields"], example["lead_time_hours"]), dynamic_shapes=shapes
    )
    batch = make_tiny_batch(model.config, batch_size=3 if dynamic_batch else 2, seed=1)
    with torch.no_grad():
        expected = model(batch["fields"], batch["lead_time_hours"]).forecast
    got = exported.module()(batch["fields"], batch["lead_time_hours"]).forecast
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_device_map_offloading_the_embeddings_to_disk(tmp_path) -> None:
    model = _biased_model()
    model.save_pretrained(tmp_path / "model")
    device_map = {"topoflow.embeddings": "disk", "topoflow.blocks": "cpu",
                  "topoflow.norm": "cpu", "head": "cpu"}  # fmt: skip
    offloaded = TopoFlowForForecasting.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.topoflow.embeddings.var_agg.out_proj.weight.device.type == "meta"
    batch = make_tiny_batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(
            offloaded(**batch).forecast, model(**batch).forecast, rtol=1e-5, atol=1e-5
        )


# 6. Smaller conventions


def test_bfloat16_loading_keeps_h_scale_exact(tmp_path) -> None:
    _biased_model(elevation_scale=1500.0).save_pretrained(tmp_path / "biased")
    TopoFlowForForecasting(make_tiny_config()).save_pretrained(tmp_path / "baseline")
    loaded = TopoFlowForForecasting.from_pretrained(tmp_path / "biased", dtype=torch.bfloat16)
    fresh = TopoFlowForForecasting.from_pretrained(
        tmp_path / "baseline", dtype=torch.bfloat16, elevation_bias_blocks=[0],
        elevation_scale=1500.0,
    )  # fmt: skip
    for model in (loaded, fresh):
        h_scale = model.topoflow.blocks[0].attn.H_scale
        assert h_scale.dtype == torch.float32
        assert h_scale.item() == 1500.0
        assert model.topoflow.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


def test_config_answers_to_the_standard_transformers_names() -> None:
    config = TopoFlowConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    assert (config.embed_dim, config.depth, config.num_heads) == (64, 3, 4)
    reference = TopoFlowConfig()
    assert (reference.hidden_size, reference.num_hidden_layers) == (768, 6)
    assert reference.num_attention_heads == 8


def test_encoder_only_checkpoint_is_named_as_such(tmp_path) -> None:
    TopoFlowModel(make_tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder-only checkpoint") as error:
        TopoFlowForForecasting.from_pretrained(tmp_path)
    assert "decoder_depth" not in str(error.value)


def test_datasets_is_pinned_to_the_majors_streaming_was_written_for() -> None:
    from importlib.metadata import version

    from packaging.requirements import Requirement

    setup_text = (REPO_ROOT / "setup.py").read_text(encoding="utf-8")
    (line,) = re.findall(r'"(datasets[<>=!~][^"]*)"', setup_text)
    specifier = Requirement(line).specifier
    assert any(spec.operator == "<" for spec in specifier), f"{line}: no upper bound"
    assert version("datasets") in specifier


def test_progress_without_a_terminal_is_periodic_lines() -> None:
    from topoflow.training.progress import PERIODIC_LINES, TrainingProgress

    log = io.StringIO()  # not a terminal, as under SLURM, CI or nohup
    total = 1458
    progress = TrainingProgress(total, 0, stream=log)
    for step in range(1, total + 1):
        progress.update(step, loss=0.5, lr=1e-4)
    progress.close()
    lines = log.getvalue().splitlines()
    assert PERIODIC_LINES <= len(lines) <= PERIODIC_LINES + 1
    assert lines[-1] == f"training: step {total}/{total} loss 0.5000 lr 1.00e-04"
    assert "\r" not in log.getvalue()
