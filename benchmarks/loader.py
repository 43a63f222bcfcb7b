"""Streaming-loader throughput vs. what a training step of the default model consumes.

    python benchmarks/loader.py [--size default] [--batch-size 16] [--samples 1536]

Prints samples/s of `make_forecast_dataset` through a torch DataLoader with 0 and 2 workers, and
samples/s of forward + backward + AdamW step of the `base` preset model on the same batches, all
measured in this one run on this machine. The loader is the training one: months mixed
(`mix_shards=True`, so it first reads all of its shards, a start-up cost printed apart) and the
preset's calendar inputs. The loader is not the bottleneck when its ratio to the training step
is well above 1 (issue 12 asks for at least 2). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from topoflow.corpus import CorpusMetadata, build_default_corpus
from topoflow.data import collate_forecast_batch, make_forecast_dataset

__all__ = ["loader_samples_per_second", "train_step_samples_per_second", "main"]


def _dataset(corpus: Path, config) -> object:
    return make_forecast_dataset(
        corpus, "train", variables=config.variables, target_variables=config.target_variables,
        lead_times_hours=config.lead_times_hours,
        normalization={"mean": config.variable_mean, "std": config.variable_std},
        seed=0, shuffle=True, mix_shards=True, time_features=config.time_features,
    )  # fmt: skip


def loader_samples_per_second(corpus: Path, config, *, workers: int, batch_size: int,
                              samples: int) -> tuple[float, float]:  # fmt: skip
    """(samples/s after the first batch, seconds to the first batch: worker start-up and the
    shard reads)."""
    loader = torch.utils.data.DataLoader(
        _dataset(corpus, config), batch_size=batch_size, num_workers=workers,
        collate_fn=collate_forecast_batch, persistent_workers=False,
    )  # fmt: skip
    first = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    startup = time.perf_counter() - first
    count, start = 0, time.perf_counter()
    for batch in iterator:
        count += len(batch["sample_ids"])
        if count >= samples:
            break
    return count / (time.perf_counter() - start), startup


def train_step_samples_per_second(corpus: Path, config, *, batch_size: int, steps: int) -> float:
    from modeling_topoflow import TopoFlowForForecasting

    model = TopoFlowForForecasting(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(_dataset(corpus, config), batch_size=batch_size,
                                         collate_fn=collate_forecast_batch)  # fmt: skip
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps + 1:
            break

    def step(batch: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up: allocator, kernels
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=["tiny", "default", "large"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1536)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--preset", default="base")
    args = parser.parse_args(argv)

    from topoflow.training.data import min_samples_per_rank
    from topoflow.training.model_setup import build_from_scratch_config

    corpus = build_default_corpus(size=args.size)
    meta = CorpusMetadata.load(corpus)
    # The training-split statistics are fitted as training does (a pass over the split, outside
    # the timings).
    config = build_from_scratch_config(args.preset, meta, elevation_blocks=[0],
                                       elevation_scale=1000.0, alpha_init=0.0, corpus=corpus)
    torch.set_num_threads(torch.get_num_threads())
    print(f"corpus {corpus} ({meta.height}x{meta.width}, {len(meta.split_shards('train'))} train "
          f"shards), {len(config.variables)} inputs, leads {config.lead_times_hours}, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    rates = {
        f"loader, {w} workers": loader_samples_per_second(
            corpus, config, workers=w, batch_size=args.batch_size, samples=args.samples)
        for w in (0, 2)
    }  # fmt: skip
    train = train_step_samples_per_second(corpus, config, batch_size=args.batch_size,
                                          steps=args.steps)  # fmt: skip
    # The start-up (reading every shard before the first mixed batch) recurs once per epoch.
    epoch_s = min_samples_per_rank(meta, "train", config.lead_times_hours, 1) / train
    print(f"{'':28s}{'samples/s':>12s}{'x train step':>14s}{'start-up s':>12s}"
          f"{'% of epoch':>12s}")  # fmt: skip
    for name, (rate, startup) in rates.items():
        print(f"{name:28s}{rate:12.1f}{rate / train:14.1f}{startup:12.1f}"
              f"{100 * startup / epoch_s:12.1f}")  # fmt: skip
    print(f"{'train step (' + args.preset + ' model)':28s}{train:12.1f}{1.0:14.1f}")


if __name__ == "__main__":
    main()
