"""Elevation-biased attention against plain SDPA on CPU (issue 17's table by default).

Prints, in one run: fp64 exactness against the eager reference (outputs and gradients of q, k, v
and alpha, sea-level ties included, and the clamp-active case) of the fused, sorted and dense
paths, fp32 error against SDPA's math kernel, forward and forward+backward time ratios per row of
B x heads x N x head dim, measured interleaved (biased and plain runs alternate, medians
reported, CPU time and wall time), and peak extra resident memory of forward+backward.

    python benchmarks/attention.py                        # the table; sdpa = what the model runs
    python benchmarks/attention.py --rows 8,8,512,96 --paths sdpa sorted dense --skip memory

Not a test: nothing here fails; the numbers and targets are printed side by side.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_topoflow import (  # noqa: E402
    clamp_is_inactive,
    dense_elevation_attention,
    eager_elevation_attention,
    elevation_bias_between,
    elevation_biased_attention,
    fused_elevation_attention,
    sorted_elevation_attention,
)

__all__ = ["main"]


def sorted_path(query, key, value, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """The sorted-token path at every size (no materialized shortcut for small problems)."""
    return sorted_elevation_attention(query, key, value, small_problem_elements=0, **kwargs)

H_SCALE_M = 1000.0
CLAMP_MAX = 10.0
# Issue 17's table: (B, heads, N, head dim) of the sizes people train at.
ISSUE_ROWS = [(8, 4, 128, 16), (8, 4, 512, 16), (8, 8, 512, 96), (8, 8, 1024, 96),
              (8, 8, 2048, 96), (1, 8, 4096, 96), (1, 8, 8192, 96)]  # fmt: skip
ALPHA = 2.0


def make_heights(batch: int, length: int, *, seed: int, top_m: float = 5000.0) -> torch.Tensor:
    """(B, N) metres: a third of the tokens at sea level (exact ties), the rest up to top_m."""
    generator = torch.Generator().manual_seed(seed)
    heights = torch.rand(batch, length, generator=generator, dtype=torch.float64) * top_m
    sea = torch.rand(batch, length, generator=generator) < 1 / 3
    heights[sea] = 0.0
    heights[:, :2] = torch.tensor([0.0, top_m], dtype=torch.float64)  # pin the range
    return heights


def make_inputs(
    batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, *, seed: int
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, length, head_dim)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype) for _ in range(4))


def attention_with_grads(
    function: Callable[..., torch.Tensor],
    tensors: tuple[torch.Tensor, ...],
    heights: torch.Tensor,
    alpha_value: float,
) -> list[torch.Tensor]:
    """Output and gradients of q, k, v and alpha for one biased-attention implementation."""
    query, key, value, grad_out = (t.clone() for t in tensors)
    for tensor in (query, key, value):
        tensor.requires_grad_(True)
    alpha = torch.tensor(alpha_value, dtype=query.dtype, requires_grad=True)
    h_scale = torch.tensor(H_SCALE_M, dtype=query.dtype)
    out = function(
        query, key, value, elevation_m=heights.to(query.dtype), alpha=alpha, h_scale=h_scale,
        clamp_max=CLAMP_MAX,
    )  # fmt: skip
    out.backward(grad_out)
    return [out.detach(), query.grad, key.grad, value.grad, alpha.grad]


def sdpa_math_attention(query, key, value, *, elevation_m, alpha, h_scale, clamp_max):  # noqa: ANN001, ANN201
    """SDPA's math kernel with the materialized bias: the fp32 error yardstick."""
    bias = elevation_bias_between(
        elevation_m, elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max
    )
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias[:, None])


def max_abs_differences(results: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    pairs = zip(results, reference, strict=True)
    return [float((got.double() - want.double()).abs().max()) for got, want in pairs]


def report_exactness(length: int, heads: int, head_dim: int) -> None:
    names = ["out", "dq", "dk", "dv", "dalpha"]
    heights = make_heights(2, length, seed=1)
    tensors = make_inputs(2, heads, length, head_dim, torch.float64, seed=2)
    print(f"\n== fp64 exactness vs eager (B=2, h={heads}, N={length}, d={head_dim}, "
          f"{int((heights == 0).sum())} sea-level ties) ==")  # fmt: skip
    reference = attention_with_grads(eager_elevation_attention, tensors, heights, ALPHA)
    paths = (("fused", fused_elevation_attention), ("sorted", sorted_path),
             ("dense", dense_elevation_attention))  # fmt: skip
    for label, function in paths:
        fast = attention_with_grads(function, tensors, heights, ALPHA)
        for name, diff in zip(names, max_abs_differences(fast, reference), strict=True):
            print(f"  {label:6s}  {name:7s} max |diff| {diff:.2e}  (target <= 1e-12)")
    steep = 5.0  # alpha * range / H = 25 > clamp: the exact chunked fallback runs
    assert not clamp_is_inactive(heights, alpha=steep, h_scale=H_SCALE_M, clamp_max=CLAMP_MAX)
    reference = attention_with_grads(eager_elevation_attention, tensors, heights, steep)
    fallback = attention_with_grads(sorted_path, tensors, heights, steep)
    worst = max(max_abs_differences(fallback, reference))
    print(f"  clamp active (alpha={steep}): fallback max |diff| over out and grads {worst:.2e}")
    fused = attention_with_grads(fused_elevation_attention, tensors, heights, steep)
    worst = max(max_abs_differences(fused, reference))
    print(f"  clamp active (alpha={steep}): fused max |diff| over out and grads {worst:.2e}")

    print("\n== fp32 max |error| vs fp64 eager (same inputs) ==")
    single = tuple(t.float() for t in tensors)
    ours = max_abs_differences(
        attention_with_grads(fused_elevation_attention, single, heights, ALPHA),
        attention_with_grads(eager_elevation_attention, tensors, heights, ALPHA),
    )
    math_kernel = max_abs_differences(
        attention_with_grads(sdpa_math_attention, single, heights, ALPHA),
        attention_with_grads(eager_elevation_attention, tensors, heights, ALPHA),
    )
    for name, mine, theirs in zip(names, ours, math_kernel, strict=True):
        print(f"  {name:7s} fused {mine:.2e}  sdpa-math {theirs:.2e}  ratio {mine / theirs:.2f}")
    # One scalar's error is a noisy yardstick: repeat alpha's over fresh inputs.
    ratios = []
    for seed in range(3, 9):
        heights = make_heights(2, length, seed=seed)
        tensors = make_inputs(2, heads, length, head_dim, torch.float64, seed=seed + 100)
        single = tuple(t.float() for t in tensors)
        exact = attention_with_grads(eager_elevation_attention, tensors, heights, ALPHA)[4]
        mine = attention_with_grads(fused_elevation_attention, single, heights, ALPHA)[4]
        theirs = attention_with_grads(sdpa_math_attention, single, heights, ALPHA)[4]
        ratios.append(float((mine.double() - exact).abs() / (theirs.double() - exact).abs()))
    print(f"  dalpha error ratio fused / sdpa-math over 6 more input seeds: median "
          f"{statistics.median(ratios):.2f}, range {min(ratios):.2f} to {max(ratios):.2f}")


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def biased_attention(path: str) -> Callable[..., torch.Tensor]:
    """The biased kernel users get ("sdpa": chosen per size) or one forced path, same arguments."""
    if path == "sdpa":
        return partial(elevation_biased_attention, implementation="sdpa")
    if path == "sorted":
        return sorted_path
    if path == "dense":
        return dense_elevation_attention
    if path == "fused":
        return fused_elevation_attention
    raise ValueError(f"--paths: unknown path {path!r}; expected sdpa, fused, sorted or dense")


def make_steps(
    shape: tuple[int, int, int, int], paths: list[str]
) -> dict[str, Callable[[], None]]:
    """Forward and forward+backward steps of plain SDPA and of each biased path, one fp32 input."""
    batch, heads, length, head_dim = shape
    query, key, value, grad_out = make_inputs(batch, heads, length, head_dim, torch.float32, seed=3)
    heights = make_heights(batch, length, seed=4).float()
    alpha = torch.tensor(ALPHA, requires_grad=True)
    h_scale = torch.tensor(H_SCALE_M)
    leaves = [t.clone().requires_grad_(True) for t in (query, key, value)]

    def biased(path: str) -> Callable[..., torch.Tensor]:
        function = biased_attention(path)
        return lambda q, k, v: function(
            q, k, v, elevation_m=heights, alpha=alpha, h_scale=h_scale, clamp_max=CLAMP_MAX
        )

    def forward(function: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                function(query, key, value)

        return step

    def training(function: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            for tensor in [*leaves, alpha]:
                tensor.grad = None
            function(*leaves).backward(grad_out)

        return step

    steps = {"plain fwd": forward(F.scaled_dot_product_attention),
             "plain fwd+bwd": training(F.scaled_dot_product_attention)}  # fmt: skip
    for path in paths:
        steps[f"{path} fwd"] = forward(biased(path))
        steps[f"{path} fwd+bwd"] = training(biased(path))
    return steps


def measure_row(
    shape: tuple[int, int, int, int], paths: list[str], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) seconds of every step, the steps interleaved repeat by repeat."""
    steps = make_steps(shape, paths)
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(repeats):
        # Alternate the order so a slow drift of the machine hits both sides equally.
        for name in names if repeat % 2 == 0 else reversed(names):
            times[name].append(timed(steps[name]))
    return {
        name: tuple(statistics.median(t[column] for t in values) for column in (0, 1))
        for name, values in times.items()
    }


def report_speed(rows: list[tuple[int, int, int, int]], paths: list[str], repeats: int) -> None:
    load = os.getloadavg()[0]
    print(f"\n== time, fp32, {torch.get_num_threads()} threads, {repeats} interleaved repeats "
          f"(fewer above 2**31 logit-dims), medians; load average {load:.1f} ==")  # fmt: skip
    print("  ratio = biased / plain SDPA on the same q, k, v; cpu: CPU seconds of this process "
          "(robust to other processes on the cores), wall: elapsed")
    print("  | B | heads | N | head dim | path | fwd+bwd cpu | fwd+bwd wall | fwd cpu | "
          "plain fwd+bwd cpu s |")
    print("  |---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for shape in rows:
        batch, heads, length, head_dim = shape
        work = batch * heads * length * length * head_dim
        median = measure_row(shape, paths, repeats if work <= 2**31 else max(3, repeats // 2))
        plain_train, plain_fwd = median["plain fwd+bwd"], median["plain fwd"]
        for path in paths:
            train, fwd = median[f"{path} fwd+bwd"], median[f"{path} fwd"]
            print(f"  | {batch} | {heads} | {length} | {head_dim} | {path} | "
                  f"{train[1] / plain_train[1]:.2f}x | {train[0] / plain_train[0]:.2f}x | "
                  f"{fwd[1] / plain_fwd[1]:.2f}x | {plain_train[1]:.3f} |", flush=True)  # fmt: skip
    print("  target (issue 17): fwd+bwd <= 1.3x on every row, aim 1.15x")


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def peak_extra_mib(step: Callable[[], None]) -> float:
    """Peak resident memory of step() above what was resident before it (Linux only)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    before = _resident_kib("VmRSS")
    step()
    return (_resident_kib("VmHWM") - before) / 1024


def _unmap_large_blocks_on_free() -> None:
    """Make resident memory follow tensor lifetimes (glibc only).

    glibc's default keeps freed blocks below a threshold that grows up to 32 MiB in the heap, so a
    step reusing them would show no extra resident memory. A fixed 1 MiB mmap threshold maps every
    larger tensor on its own and unmaps it on free. Called after the timings: page faults on every
    fresh mapping would slow both sides.
    """
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3  # from malloc.h
    if libc.mallopt(m_mmap_threshold, 1 << 20) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed; memory numbers would be wrong")


def measure_memory(length: int, heads: int, head_dim: int) -> tuple[float, float]:
    """(plain, biased) peak extra MiB of one fwd+bwd; meant for a fresh process (see below)."""
    _unmap_large_blocks_on_free()
    steps = make_steps((1, heads, length, head_dim), ["sdpa"])
    steps["sdpa fwd+bwd"]()  # first call allocates lazily initialized state
    plain = peak_extra_mib(steps["plain fwd+bwd"])
    biased = peak_extra_mib(steps["sdpa fwd+bwd"])
    return plain, biased


def report_memory(lengths: list[int], heads: int, head_dim: int, threads: int) -> None:
    """Each N in its own process: in one process, heap pages kept from earlier (larger or timed)
    steps would hide part of a later step's allocations and make the small-N numbers too low."""
    print(f"\n== peak extra resident memory of fwd+bwd (MiB), B=1, h={heads}, d={head_dim}, "
          "one fresh process per N ==")
    previous = None
    for length in lengths:
        command = [sys.executable, __file__, "--measure-memory", str(length), "--heads",
                   str(heads), "--head-dim", str(head_dim), "--threads", str(threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        plain, biased = (float(x) for x in output.split()[-2:])
        growth = f"x{biased / previous:.2f} per doubling" if previous else ""
        print(f"  N={length:5d}  plain {plain:7.1f}  biased {biased:7.1f}  {growth}")
        previous = biased
    print("  targets: biased grows <= 2.1x per doubling, < 600 MiB at N=8192")


def parse_row(text: str) -> tuple[int, int, int, int]:
    try:
        batch, heads, length, head_dim = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rows: expected B,heads,N,head_dim such as 8,8,512,96; got {text!r}"
        ) from None
    return batch, heads, length, head_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=parse_row, nargs="+", default=ISSUE_ROWS,
                        metavar="B,HEADS,N,HEAD_DIM",
                        help="speed sweep (default: issue 17's table)")
    parser.add_argument("--paths", nargs="+", default=["sdpa"],
                        choices=["sdpa", "fused", "sorted", "dense"],
                        help="biased kernels to time: sdpa (chosen per size, what the model runs) "
                        "and the forced paths it chooses between")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="memory sweep, B=1")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="1 by default: on a shared machine, threads waiting for each other "
                        "at every barrier dominate small problems")
    parser.add_argument("--exact-length", type=int, default=384)
    parser.add_argument("--skip", nargs="*", default=[], choices=["exact", "speed", "memory"])
    parser.add_argument("--measure-memory", type=int, default=None, metavar="N",
                        help=argparse.SUPPRESS)  # internal: one N, printed for report_memory
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory is not None:
        print(*measure_memory(args.measure_memory, args.heads, args.head_dim))
        return
    print(f"torch {torch.__version__}, {args.threads} threads")
    if "exact" not in args.skip:
        report_exactness(args.exact_length, 4, args.head_dim)
    if "speed" not in args.skip:
        report_speed(args.rows, args.paths, args.repeats)
    if "memory" not in args.skip:
        report_memory(args.lengths, args.heads, args.head_dim, args.threads)


if __name__ == "__main__":
    main()
