"""How a trained TopoFlow model uses attention, and how much its elevation bias matters.

    python scripts/attention_diagnostics.py MODEL [--corpus DIR] [--split validation]

For every block, on a few batches of the split:

- entropy of the attention rows (mean over samples, heads and queries) against log N, the entropy
  of uniform attention: a block near log N pools the whole domain rather than picking sources;
- the attention mass a query puts on *higher* keys divided by the share of higher keys (1 = the
  block ignores elevation; < 1 = it already discounts higher sources by itself), and the same for
  lower keys;
- for biased blocks, the loss with the learned alpha and with alpha set to 0 (all blocks at once):
  how much the bias changes the function.

The attention probabilities are recomputed from each block's own q and k (plain softmax of
q.k / sqrt(d) plus the block's elevation bias), so this works whatever attention implementation
the model runs with. Used for the investigation in docs/results/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from modeling_topoflow import (  # noqa: E402 (needs the repo on sys.path)
    TopoFlowForForecasting,
    elevation_bias_matrix,
    oriented_elevation,
    patch_mean_elevation,
)
from topoflow.data import make_forecast_dataset  # noqa: E402
from topoflow.data.collate import collate_forecast_batch  # noqa: E402


def load_batches(model: TopoFlowForForecasting, corpus: str, split: str, n_batches: int,
                 batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Batches spread over the split (every 7th sample), normalized as the model was trained."""
    config = model.config
    dataset = make_forecast_dataset(
        corpus, split, variables=config.variables, target_variables=config.target_variables,
        lead_times_hours=config.lead_times_hours, shuffle=False,
        normalization={"mean": config.variable_mean, "std": config.variable_std},
        time_features=config.time_features)
    samples = list(itertools.islice(iter(dataset), 0, n_batches * batch_size * 7, 7))
    if len(samples) < batch_size:
        raise ValueError(f"{corpus}: split {split!r} has too few samples for one batch")
    return [collate_forecast_batch(samples[i:i + batch_size])
            for i in range(0, len(samples) - batch_size + 1, batch_size)]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "sample_ids"}


class AttentionStats:
    """Sums over rows of one block's attention: entropy, mass on higher/lower keys, key shares."""

    def __init__(self) -> None:
        self.rows = 0
        self.entropy = 0.0
        self.mass_higher = self.share_higher = 0.0
        self.mass_lower = self.share_lower = 0.0

    def add(self, probs: torch.Tensor, heights: torch.Tensor) -> None:
        # probs (B, h, N, N); heights (B, N) metres, in the model's own (unoriented) heights.
        higher = (heights[:, None, :] > heights[:, :, None]).to(probs.dtype)[:, None]  # (B,1,N,N)
        lower = (heights[:, None, :] < heights[:, :, None]).to(probs.dtype)[:, None]
        n_rows = probs.shape[0] * probs.shape[1] * probs.shape[2]
        self.rows += n_rows
        self.entropy += float(-(probs * probs.clamp_min(1e-30).log()).sum())
        length = probs.shape[-1]
        self.mass_higher += float((probs * higher).sum())
        self.share_higher += float(higher.sum()) * probs.shape[1] / length
        self.mass_lower += float((probs * lower).sum())
        self.share_lower += float(lower.sum()) * probs.shape[1] / length

    def summary(self, length: int) -> dict[str, float]:
        return {
            "entropy": self.entropy / self.rows,
            "uniform_entropy": math.log(length),
            "higher_mass_over_share": self.mass_higher / max(self.share_higher, 1e-30),
            "lower_mass_over_share": self.mass_lower / max(self.share_lower, 1e-30),
        }


def attention_statistics(model: TopoFlowForForecasting, batches: Sequence[dict]) -> list[dict]:
    """Per block: the statistics of AttentionStats, from each block's recomputed attention."""
    encoder = model.topoflow
    stats = [AttentionStats() for _ in encoder.blocks]
    captured: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    hooks = [
        block.attn.register_forward_hook(
            lambda module, args, out, index=index: captured.__setitem__(index, args))
        for index, block in enumerate(encoder.blocks)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                captured.clear()
                model(**model_inputs(batch))
                heights = patch_heights(model, batch["fields"])
                for index, block in enumerate(encoder.blocks):
                    hidden = captured[index][0]
                    probs = _block_attention(block.attn, hidden, heights)
                    stats[index].add(probs, heights)
    finally:
        for hook in hooks:
            hook.remove()
    length = model.config.num_patches
    return [s.summary(length) for s in stats]


def patch_heights(model: TopoFlowForForecasting, fields: torch.Tensor) -> torch.Tensor:
    """(B, N) patch-mean elevation in metres from the normalized elevation channel (the model
    computes it only when a block is biased; the statistics are wanted for the control too)."""
    config = model.config
    channel = config.elevation_channel
    if channel is None:
        raise ValueError(f"the model's inputs {config.variables} carry no elevation channel "
                         f"({config.elevation_variable!r})")
    name = config.variables[channel]
    metres = fields[:, channel] * config.variable_std[name] + config.variable_mean[name]
    return patch_mean_elevation(metres, config.patch_size)


def _block_attention(attn: torch.nn.Module, hidden: torch.Tensor,
                     heights: torch.Tensor) -> torch.Tensor:
    batch, length, dim = hidden.shape
    qkv = attn.qkv(hidden).reshape(batch, length, 3, attn.num_heads, dim // attn.num_heads)
    query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    logits = query @ key.transpose(-1, -2) / math.sqrt(dim // attn.num_heads)
    if attn.has_elevation_bias:
        bias = elevation_bias_matrix(
            oriented_elevation(heights, attn.config.elevation_bias_direction),
            alpha=attn.elevation_alpha, h_scale=attn.H_scale,
            clamp_max=attn.config.elevation_bias_clamp)
        logits = logits + bias[:, None]
    return logits.softmax(dim=-1)


def mean_loss(model: TopoFlowForForecasting, batches: Sequence[dict]) -> float:
    with torch.no_grad():
        return sum(float(model(**model_inputs(b)).loss) for b in batches) / len(batches)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model folder or packaged short name")
    parser.add_argument("--corpus", default=None, help="default: the embedded corpus")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    import topoflow  # noqa: F401  (short names)

    model = TopoFlowForForecasting.from_pretrained(args.model).eval()
    config = model.config
    if config.elevation_bias_rise != "endpoint" or config.elevation_alpha_per_head:
        # _block_attention rebuilds the endpoint bias with one alpha per block.
        parser.error(f"{args.model}: elevation_bias_rise={config.elevation_bias_rise!r}, "
                     f"elevation_alpha_per_head={config.elevation_alpha_per_head}: only the "
                     "endpoint bias with one alpha per block is diagnosed here")
    corpus = args.corpus
    if corpus is None:
        from topoflow.corpus import build_default_corpus

        corpus = str(build_default_corpus())
    batches = load_batches(model, corpus, args.split, args.batches, args.batch_size)
    print(f"{args.model}: N = {model.config.num_patches} tokens, "
          f"{sum(b['fields'].shape[0] for b in batches)} samples of {args.split}")
    for index, row in enumerate(attention_statistics(model, batches)):
        alpha = ""
        attn = model.topoflow.blocks[index].attn
        if attn.has_elevation_bias:
            alpha = (f"  alpha {float(attn.elevation_alpha.detach()):.4f} "
                     f"({attn.config.elevation_bias_direction})")
        print(f"block {index}: entropy {row['entropy']:.3f} (uniform {row['uniform_entropy']:.3f})"
              f"  mass/share on higher keys {row['higher_mass_over_share']:.3f}, on lower keys "
              f"{row['lower_mass_over_share']:.3f}{alpha}")
    alphas = model.elevation_alpha_parameters()
    if alphas:
        learned = mean_loss(model, batches)
        saved = [a.detach().clone() for a in alphas]
        with torch.no_grad():
            for a in alphas:
                a.zero_()
        without = mean_loss(model, batches)
        with torch.no_grad():
            for a, value in zip(alphas, saved, strict=True):
                a.copy_(value)
        print(f"loss with the learned alphas {learned:.6f}, with every alpha = 0 {without:.6f} "
              f"({100 * (without - learned) / learned:+.2f}% without the bias)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
