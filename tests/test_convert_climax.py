"""ClimaX -> TopoFlow conversion: a ClimaX-layout state dict built here (key names and shapes of
microsoft/ClimaX src/climax/arch.py with timm's Block and PatchEmbed) converts with zero unmapped
keys, and the converted model forecasts what ClimaX's forward computes from the source tensors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config
from topoflow.convert_climax import (
    convert_climax_checkpoint,
    convert_climax_state_dict,
    load_climax_state_dict,
    main,
)

# ClimaX was trained with one more variable than the TopoFlow config uses, in another order.
CLIMAX_VARIABLES = ["t2m", *reversed(make_tiny_config().variables)]


def climax_state_dict(config, grouped: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dim, patch, num_vars = config.embed_dim, config.patch_size, len(CLIMAX_VARIABLES)
    hidden = int(dim * config.mlp_ratio)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    state = {
        "var_embed": rand(1, num_vars, dim),
        "var_query": rand(1, 1, dim),
        "var_agg.in_proj_weight": rand(3 * dim, dim),
        "var_agg.in_proj_bias": rand(3 * dim),
        "var_agg.out_proj.weight": rand(dim, dim),
        "var_agg.out_proj.bias": rand(dim),
        "pos_embed": rand(1, config.num_patches, dim),
        "lead_time_embed.weight": rand(dim, 1),
        "lead_time_embed.bias": rand(dim),
        "norm.weight": 1 + rand(dim, scale=0.05),
        "norm.bias": rand(dim, scale=0.05),
        "head.0.weight": rand(dim, dim),
        "head.0.bias": rand(dim),
        "head.2.weight": rand(dim, dim),
        "head.2.bias": rand(dim),
        "head.4.weight": rand(num_vars * patch**2, dim),
        "head.4.bias": rand(num_vars * patch**2),
    }
    if grouped:
        state["token_embeds.proj_weights"] = rand(num_vars, dim, 1, patch, patch)
        state["token_embeds.proj_biases"] = rand(num_vars, dim)
    else:
        for index in range(num_vars):
            state[f"token_embeds.{index}.proj.weight"] = rand(dim, 1, patch, patch)
            state[f"token_embeds.{index}.proj.bias"] = rand(dim)
    for block in range(config.depth):
        for name, shape in {
            "norm1": (dim,), "attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim),
            "norm2": (dim,), "mlp.fc1": (hidden, dim), "mlp.fc2": (dim, hidden),
        }.items():  # fmt: skip
            weight_init = 1.0 if name.startswith("norm") else 0.0
            state[f"blocks.{block}.{name}.weight"] = weight_init + rand(*shape)
            state[f"blocks.{block}.{name}.bias"] = rand(shape[0])
    return state


def climax_forward(state, config, fields, lead_time_hours) -> torch.Tensor:
    """ClimaX's forward (arch.py) on the raw tensors, by their ClimaX names."""
    patch, heads = config.patch_size, config.num_heads
    ids = [CLIMAX_VARIABLES.index(name) for name in config.variables]
    tokens = []
    for channel, index in enumerate(ids):
        if "token_embeds.proj_weights" in state:
            weight = state["token_embeds.proj_weights"][index]
            bias = state["token_embeds.proj_biases"][index]
        else:
            weight = state[f"token_embeds.{index}.proj.weight"]
            bias = state[f"token_embeds.{index}.proj.bias"]
        embedded = F.conv2d(fields[:, channel : channel + 1], weight, bias, stride=patch)
        tokens.append(embedded.flatten(2).transpose(1, 2))  # (B, L, D)
    x = torch.stack(tokens, dim=1) + state["var_embed"][:, ids].unsqueeze(2)  # (B, V, L, D)
    batch, _, length, dim = x.shape
    x = torch.einsum("bvld->blvd", x).flatten(0, 1)
    aggregator = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    aggregator.load_state_dict(
        {
            key[len("var_agg.") :]: value
            for key, value in state.items()
            if key.startswith("var_agg.")
        }
    )
    query = state["var_query"].repeat_interleave(x.shape[0], dim=0)
    x = aggregator(query, x, x)[0].squeeze(1).unflatten(0, (batch, length))
    x = x + state["pos_embed"]
    lead = (lead_time_hours / 100).unsqueeze(-1)
    x = x + F.linear(lead, state["lead_time_embed.weight"], state["lead_time_embed.bias"])[:, None]
    for block in range(config.depth):
        p = f"blocks.{block}."
        y = F.layer_norm(x, (dim,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        qkv = F.linear(y, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, length, dim)
        x = x + F.linear(attn, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        y = F.layer_norm(x, (dim,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        y = F.gelu(F.linear(y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(y, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    x = F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"])
    for layer in (0, 2):
        x = F.gelu(F.linear(x, state[f"head.{layer}.weight"], state[f"head.{layer}.bias"]))
    x = F.linear(x, state["head.4.weight"], state["head.4.bias"])  # (B, L, V_c * p * p)
    height, width = config.grid_size
    x = x.reshape(batch, height, width, patch, patch, len(CLIMAX_VARIABLES))
    images = torch.einsum("nhwpqc->nchpwq", x).reshape(batch, -1, height * patch, width * patch)
    return images[:, [CLIMAX_VARIABLES.index(name) for name in config.target_variables]]


@pytest.mark.parametrize("grouped", [False, True])
def test_converted_model_forecasts_like_climax(grouped):
    config = make_tiny_config()
    state = climax_state_dict(config, grouped)
    converted, report = convert_climax_state_dict(state, config, CLIMAX_VARIABLES)

    assert report.unmapped == []
    assert report.missing == []
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
    assert report["unmapped"] == []
    assert report["missing"] == [
        "topoflow.blocks.0.attn.H_scale",
        "topoflow.blocks.0.attn.elevation_alpha",
    ]
    model, info = TopoFlowForForecasting.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.topoflow.blocks[0].attn.H_scale.item() == 1000.0
    batch = make_tiny_batch(config)
    with torch.no_grad():
        ours = model.eval()(batch["fields"], batch["lead_time_hours"]).forecast
        reference = climax_forward(state, config, batch["fields"], batch["lead_time_hours"])
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)  # alpha_init = 0


def test_unknown_keys_are_refused_unless_allowed(tmp_path):
    config = make_tiny_config()
    state = climax_state_dict(config, grouped=True)
    state["denormalization.mean"] = torch.zeros(3)
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}}, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="denormalization.mean"):
        convert_climax_checkpoint(tmp_path / "c.ckpt", tmp_path / "out", config, CLIMAX_VARIABLES)
    report = convert_climax_checkpoint(
        tmp_path / "c.ckpt", tmp_path / "out", config, CLIMAX_VARIABLES, allow_unmapped=True
    )
    assert report.unmapped == ["denormalization.mean"]


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
