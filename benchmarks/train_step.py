"""Training-step throughput and peak memory: TopoFlow (elevation bias in block 0) vs the baseline.

One optimizer step (forward, masked-MSE loss, backward, AdamW) on a synthetic batch whose
elevation channel is a terrain in metres with sea-level ties. The two models alternate step by
step (interleaved) and the medians are compared; then each model's peak extra resident memory of
one step is measured. Sizes:

    default    the `base` preset on the embedded corpus grid (32 x 64, patch 4: N = 128 tokens,
               D = 96, anomaly head, calendar inputs), also timed against the preset that
               made the previous topoflow-base (D = 64, full-field head, no calendar inputs)
    n2048      the `base` preset on the researchers' 128 x 256 grid at patch 4 (N = 2048 tokens)
    reference  TopoFlowConfig() itself: 128 x 256, patch 2 (N = 8192), D = 768, depth 6
    worlds     the `worlds` preset on the terrain worlds' 16 x 32 grid (patch 2: N = 128)

`--ablations` adds the issue-14 arms whose bias is materialized (B, heads, N, N): the oracle
(`elevation_bias_rise="path"`, upslope) and one alpha per head (`elevation_alpha_per_head`).

    python benchmarks/train_step.py                        # default size, batch 8
    python benchmarks/train_step.py --size n2048           # batch 8
    python benchmarks/train_step.py --size reference --batch 1 --steps 2
    python benchmarks/train_step.py --size worlds --ablations

Not a test: the numbers and the issue-17 target (TopoFlow >= 0.95x the baseline's samples/s at the
default size and at N = 2048) are printed side by side.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configuration_topoflow import TopoFlowConfig  # noqa: E402
from modeling_topoflow import TopoFlowForForecasting  # noqa: E402
from topoflow.data.time_features import encode_time_features  # noqa: E402
from topoflow.training.model_setup import preset_for_timing  # noqa: E402

__all__ = ["main"]

SIZES = {
    "default": {**preset_for_timing("base"), "img_size": (32, 64)},
    "n2048": {**preset_for_timing("base"), "img_size": (128, 256)},
    "reference": {},
    "worlds": {**preset_for_timing("worlds", lead_times_hours=(12, 24)), "img_size": (16, 32),
               "lead_times_hours": (12, 24)},
}
ABLATIONS = {
    "oracle": {"elevation_bias_rise": "path", "elevation_bias_direction": "upslope"},
    "per_head": {"elevation_alpha_per_head": True, "elevation_bias_direction": "upslope"},
}
# The `base` preset before issue 12 (how the previous topoflow-base was trained).
PREVIOUS_BASE = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0,
                 "decoder_depth": 2, "drop_path": 0.1, "drop_rate": 0.0, "img_size": (32, 64)}


def make_config(size: str, biased: bool, **ablation: object) -> TopoFlowConfig:
    # alpha = 2 (the paper's init) keeps the clamp inactive for terrain up to 5000 m, so the
    # biased block runs the sorted-token path rather than its clamp fallback.
    extra = {"elevation_bias_blocks": [0], "elevation_alpha_init": 2.0} if biased else {}
    return TopoFlowConfig(**SIZES[size], **extra, **ablation)


def make_batch(config: TopoFlowConfig, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Normalized random fields whose elevation channel is a 0..5000 m terrain with sea level."""
    generator = torch.Generator().manual_seed(seed)
    height, width = config.img_size
    fields = torch.randn(batch, len(config.variables), height, width, generator=generator)
    rows = torch.linspace(0, 1, height)[:, None]
    columns = torch.linspace(1, 0, width)[None, :]
    terrain_m = (5000.0 * rows * columns).clamp(min=0.0)  # a plateau in one corner
    terrain_m[:, width // 2 :] = 0.0  # sea
    channel = config.elevation_channel
    if channel is not None:
        name = config.variables[channel]
        mean, std = config.variable_mean[name], config.variable_std[name]
        fields[:, channel] = (terrain_m - mean) / std
    inputs = {
        "fields": fields,
        "lead_time_hours": torch.full((batch,), 24.0),
        "labels": torch.randn(
            batch, len(config.target_variables), height, width, generator=generator
        ),
        "region_mask": torch.ones(batch, height, width, dtype=torch.bool),
    }
    if config.time_features:  # 2018-01-01T00 UTC + 6 h per sample
        inputs["time_features"] = torch.stack([
            torch.from_numpy(encode_time_features(config.time_features, 420_768 + 6 * k, 24))
            for k in range(batch)
        ])  # fmt: skip
    return inputs


def make_step(model: TopoFlowForForecasting, batch: dict[str, torch.Tensor]):  # noqa: ANN201
    """One optimizer step: forward, loss, backward, AdamW (also used by benchmarks/gpu_check.py)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def peak_extra_mib(step) -> float:  # noqa: ANN001
    """Peak resident memory of step() above what was resident before it (Linux, glibc)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    before = _resident_kib("VmRSS")
    step()
    return (_resident_kib("VmHWM") - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--batch", type=int, default=None, help="default: 8, or 1 at reference")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="1 by default: on a shared machine, waiting threads dominate")
    parser.add_argument("--ablations", action="store_true",
                        help="also time the oracle and per-head-alpha arms (materialized bias)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch_size = args.batch or (1 if args.size == "reference" else 8)
    torch.manual_seed(0)
    models = {"baseline": make_config(args.size, False), "topoflow": make_config(args.size, True)}
    if args.size == "default":
        models["previous"] = TopoFlowConfig(**PREVIOUS_BASE)
    if args.ablations:
        models.update({name: make_config(args.size, True, **ablation)
                       for name, ablation in ABLATIONS.items()})
    steps = {}
    for name, config in models.items():
        model = TopoFlowForForecasting(config)
        steps[name] = make_step(model, make_batch(config, batch_size, seed=1))
    config = models["topoflow"]
    tokens = (config.img_size[0] // config.patch_size) * (config.img_size[1] // config.patch_size)
    print(f"torch {torch.__version__}, {args.threads} threads, size {args.size} (N={tokens}, "
          f"D={config.embed_dim}, depth {config.depth}), batch {batch_size}, attention sdpa")
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.steps):
        for name in list(steps) if repeat % 2 == 0 else reversed(list(steps)):
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    rate = {name: batch_size / statistics.median(values) for name, values in times.items()}
    for name in steps:
        print(f"  {name:9s} {statistics.median(times[name]):7.3f} s/step  "
              f"{rate[name]:8.2f} samples/s")  # fmt: skip
    cpu_rate = {name: batch_size / statistics.median(values) for name, values in cpu.items()}
    print(f"  topoflow / baseline samples/s: {rate['topoflow'] / rate['baseline']:.3f} wall, "
          f"{cpu_rate['topoflow'] / cpu_rate['baseline']:.3f} CPU time "
          "(target >= 0.95 at the default size and at N = 2048)")
    for name in ABLATIONS:
        if name in rate:
            print(f"  {name} / baseline samples/s: {rate[name] / rate['baseline']:.3f} wall, "
                  f"{cpu_rate[name] / cpu_rate['baseline']:.3f} CPU time")
    if "previous" in rate:
        print(f"  base preset / previous base preset samples/s: "
              f"{rate['baseline'] / rate['previous']:.3f}")
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: large blocks unmapped on free (see attention.py)
    for name, step in steps.items():
        print(f"  {name:9s} peak extra resident memory of a step: {peak_extra_mib(step):8.1f} MiB")


if __name__ == "__main__":
    main()
