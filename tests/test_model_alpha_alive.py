"""alpha >= 0 is kept alive by the model itself, in any training loop (DESIGN.md section 3).

Below 0 the clamped bias and alpha's gradient are both exactly 0, so a loop that lets one step
push alpha below 0 kills the bias for good. These tests train with loops that know nothing about
alpha: a plain AdamW loop and transformers' Trainer.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config

# Seeds and a learning rate with which a plain AdamW loop drove alpha below 0 with a gradient of
# exactly 0 within four steps before the model kept alpha itself (seeds 0, 1 and 3 of these).
SEEDS = (0, 1, 2, 3)
LEARNING_RATE = 1e-2


def _alpha_and_its_gradient(model: TopoFlowForForecasting, batch: dict) -> tuple[float, float]:
    """alpha after training, and its gradient at a fresh batch (train mode, as a next step sees)."""
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    alpha = model.topoflow.blocks[0].attn.elevation_alpha
    return float(alpha.detach()), float(alpha.grad)


def test_alpha_stays_alive_in_a_plain_adamw_loop() -> None:
    for seed in SEEDS:
        torch.manual_seed(seed)
        config = make_tiny_config(elevation_bias_blocks=[0])
        model = TopoFlowForForecasting(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
        for step in range(4):
            optimizer.zero_grad()
            model(**make_tiny_batch(config, seed=10 * seed + step)).loss.backward()
            optimizer.step()
        alpha, gradient = _alpha_and_its_gradient(model, make_tiny_batch(config, seed=999))
        assert alpha >= 0.0, f"seed {seed}: alpha {alpha} < 0"
        assert gradient != 0.0, f"seed {seed}: alpha {alpha} has a gradient of exactly 0"


class _TinyBatches(Dataset):
    """Samples of the tiny batch format, one per item, for transformers' Trainer."""

    def __init__(self, config, count: int) -> None:
        batch = make_tiny_batch(config, batch_size=count, seed=5)
        self.samples = [
            {key: value[index] for key, value in batch.items() if torch.is_tensor(value)}
            for index in range(count)
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def test_alpha_stays_alive_under_transformers_trainer(tmp_path) -> None:
    dead = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        config = make_tiny_config(elevation_bias_blocks=[0])
        model = TopoFlowForForecasting(config)
        arguments = TrainingArguments(
            output_dir=str(tmp_path / f"seed{seed}"), max_steps=4, learning_rate=LEARNING_RATE,
            per_device_train_batch_size=2, lr_scheduler_type="constant", warmup_steps=0,
            seed=seed, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
        )  # fmt: skip
        Trainer(model=model, args=arguments, train_dataset=_TinyBatches(config, 8)).train()
        alpha, gradient = _alpha_and_its_gradient(model, make_tiny_batch(config, seed=999))
        assert alpha >= 0.0, f"seed {seed}: alpha {alpha} < 0 after Trainer"
        if gradient == 0.0:
            dead.append(seed)
    assert not dead, f"alpha's gradient is exactly 0 after Trainer for seeds {dead}"


def test_step_zero_forecast_and_checkpoint_key_are_unchanged(tmp_path) -> None:
    torch.manual_seed(0)
    baseline = TopoFlowForForecasting(make_tiny_config()).train()
    baseline.save_pretrained(tmp_path)
    biased, info = TopoFlowForForecasting.from_pretrained(
        tmp_path, elevation_bias_blocks=[0], output_loading_info=True
    )
    biased.train()
    batch = make_tiny_batch(biased.config)
    # Train mode, where the model projects alpha: still the baseline's function at step 0 (the
    # biased block's kernel differs from the plain one only by rounding).
    difference = (biased(**batch).forecast - baseline(**batch).forecast).abs().max().item()
    assert difference <= 1e-6
    assert biased.topoflow.blocks[0].attn.elevation_alpha.item() == 0.0
    assert "topoflow.blocks.0.attn.elevation_alpha" in info["missing_keys"]
    assert "topoflow.blocks.0.attn.elevation_alpha" in biased.state_dict()
