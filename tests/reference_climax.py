"""Self-written references for checkpoint conversion: source state dicts in the key layouts of
microsoft/ClimaX (src/climax/arch.py with timm's Block and PatchEmbed) and of the TopoFlow paper
code (AmmarKheder/TopoFlow, topoflow/model.py), and their forward written from the equations, on
the raw tensors by their source names. No upstream code is copied here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from configuration_topoflow import TopoFlowConfig
from tests.fixtures_model import make_tiny_config

__all__ = [
    "CLIMAX_VARIABLES",
    "climax_forward",
    "climax_state_dict",
    "paper_forward",
    "paper_state_dict",
]

# ClimaX was trained with one more variable than the TopoFlow config uses, in another order.
CLIMAX_VARIABLES = ["t2m", *reversed(make_tiny_config().variables)]
_BLOCK_SHAPES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def climax_state_dict(
    config: TopoFlowConfig,
    grouped: bool,
    seed: int = 0,
    variables: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Random tensors with ClimaX's names and shapes for `config`'s geometry."""
    variables = CLIMAX_VARIABLES if variables is None else variables
    generator = torch.Generator().manual_seed(seed)
    dim, patch, num_vars = config.embed_dim, config.patch_size, len(variables)
    hidden = int(dim * config.mlp_ratio)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
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
    shapes = dict(zip(_BLOCK_SHAPES, [(dim,), (3 * dim, dim), (dim, dim), (dim,),
                                      (hidden, dim), (dim, hidden)], strict=True))  # fmt: skip
    for block in range(config.depth):
        for name, shape in shapes.items():
            weight_init = 1.0 if name.startswith("norm") else 0.0
            state[f"blocks.{block}.{name}.weight"] = weight_init + rand(*shape)
            state[f"blocks.{block}.{name}.bias"] = rand(shape[0])
    return state


def paper_state_dict(
    config: TopoFlowConfig, seed: int = 0, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """The TopoFlow paper code's layout for `config.variables`, as its Lightning module saves it
    (`model.` prefix, `china_mask` buffer); with `alpha`, block 0 carries its elevation bias."""
    state = climax_state_dict(config, grouped=True, seed=seed, variables=list(config.variables))
    generator = torch.Generator().manual_seed(seed + 1)
    state["patch_embed.proj_weights"] = state.pop("token_embeds.proj_weights")
    state["patch_embed.proj_biases"] = state.pop("token_embeds.proj_biases")
    state["patch_embed.norm.weight"] = 1 + 0.3 * torch.randn(config.embed_dim, generator=generator)
    state["patch_embed.norm.bias"] = 0.3 * torch.randn(config.embed_dim, generator=generator)
    if alpha is not None:
        state["blocks.0.attn.alpha"] = torch.tensor([alpha])
    checkpoint = {f"model.{key}": value for key, value in state.items()}
    checkpoint["china_mask"] = torch.ones(*config.img_size)
    return checkpoint


def climax_forward(
    state: dict[str, torch.Tensor],
    config: TopoFlowConfig,
    fields: torch.Tensor,
    lead_time_hours: torch.Tensor,
    variables: list[str] | None = None,
) -> torch.Tensor:
    """ClimaX's forward on the raw tensors (lead time in hours / 100), for `config`'s inputs."""
    variables = CLIMAX_VARIABLES if variables is None else variables
    ids = [variables.index(name) for name in config.variables]
    tokens = _patch_tokens(state, config, fields, ids)
    x = _encode(state, config, tokens, ids, lead_time_hours / 100, elevation_bias=None)
    return _decode(state, config, x, variables)


def paper_forward(
    checkpoint: dict[str, torch.Tensor],
    config: TopoFlowConfig,
    fields: torch.Tensor,
    lead_time_hours: torch.Tensor,
) -> torch.Tensor:
    """The paper code's forward: a LayerNorm on each variable's tokens, lead time in raw hours, and
    in block 0 (when `alpha` is present) -alpha * ReLU((e_j - e_i) / 1000) clamped to [-10, 0],
    with e the patch mean of the *normalized* elevation channel."""
    state = {key.removeprefix("model."): value for key, value in checkpoint.items()}
    state["token_embeds.proj_weights"] = state["patch_embed.proj_weights"]
    state["token_embeds.proj_biases"] = state["patch_embed.proj_biases"]
    ids = list(range(len(config.variables)))
    tokens = _patch_tokens(state, config, fields, ids)
    tokens = F.layer_norm(
        tokens,
        (config.embed_dim,),
        state["patch_embed.norm.weight"],
        state["patch_embed.norm.bias"],
    )
    bias = None
    if "blocks.0.attn.alpha" in state:
        elevation = fields[:, config.variables.index("elevation")][:, None]
        heights = F.avg_pool2d(elevation, config.patch_size).flatten(1)  # (B, N) normalized
        rise = (heights[:, None, :] - heights[:, :, None]) / 1000.0
        bias = torch.clamp(-state["blocks.0.attn.alpha"] * torch.relu(rise), -10.0, 0.0)
    x = _encode(state, config, tokens, ids, lead_time_hours, elevation_bias=bias)
    return _decode(state, config, x, list(config.variables))


def _patch_tokens(state, config, fields, ids) -> torch.Tensor:
    tokens = []
    for channel, index in enumerate(ids):
        if "token_embeds.proj_weights" in state:
            weight = state["token_embeds.proj_weights"][index]
            bias = state["token_embeds.proj_biases"][index]
        else:
            weight = state[f"token_embeds.{index}.proj.weight"]
            bias = state[f"token_embeds.{index}.proj.bias"]
        embedded = F.conv2d(
            fields[:, channel : channel + 1], weight, bias, stride=config.patch_size
        )
        tokens.append(embedded.flatten(2).transpose(1, 2))  # (B, L, D)
    return torch.stack(tokens, dim=1)  # (B, V, L, D)


def _encode(state, config, tokens, ids, lead, elevation_bias) -> torch.Tensor:
    heads = config.num_heads
    x = tokens + state["var_embed"][:, ids].unsqueeze(2)  # (B, V, L, D)
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
    x = x + F.linear(lead.unsqueeze(-1), state["lead_time_embed.weight"],
                     state["lead_time_embed.bias"])[:, None]  # fmt: skip
    for block in range(config.depth):
        p = f"blocks.{block}."
        y = F.layer_norm(x, (dim,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        qkv = F.linear(y, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * (dim // heads) ** -0.5
        if block == 0 and elevation_bias is not None:
            logits = logits + elevation_bias[:, None]  # shared by the heads
        attn = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(batch, length, dim)
        x = x + F.linear(attn, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        y = F.layer_norm(x, (dim,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        y = F.gelu(F.linear(y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(y, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"])


def _decode(state, config, x, variables) -> torch.Tensor:
    for layer in (0, 2):
        x = F.gelu(F.linear(x, state[f"head.{layer}.weight"], state[f"head.{layer}.bias"]))
    x = F.linear(x, state["head.4.weight"], state["head.4.bias"])  # (B, L, V_src * p * p)
    height, width = config.grid_size
    patch = config.patch_size
    x = x.reshape(x.shape[0], height, width, patch, patch, len(variables))
    images = torch.einsum("nhwpqc->nchpwq", x).reshape(
        x.shape[0], -1, height * patch, width * patch
    )
    return images[:, [variables.index(name) for name in config.target_variables]]
