"""The GPU check of issue 17, in one run of under 8 minutes on one GPU, printing one table.

    python benchmarks/gpu_check.py            # on a CUDA machine; exit 0 when every check passes

1. the CUDA-only tests (pytest -k cuda);
2. FlexAttention and the sorted kernel's CUDA branch (the `sdpa` path) against the eager
   reference in outputs and gradients of q, k, v and alpha (fp32 on the GPU, fp64 eager on the CPU
   as the truth, fp32 eager on the GPU as the yardstick), clamp inactive and alpha = 0;
3. biased vs plain flash attention (bf16, forward + backward, interleaved medians) at N = 2048
   (B = 8) and N = 8192 (B = 2), 8 heads, head dim 96, for `sdpa` and `flex_attention`;
4. the reference-size training step (128 x 256, patch 2, N = 8192, D = 768, depth 6) in bf16
   autocast at batch 8: samples/s and peak memory, TopoFlow (bias in block 0) vs the baseline.

Without CUDA it says so, dry-runs everything that does not need the GPU at small sizes on the CPU
(the same code paths, so the script is known to run), and exits with status 2.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]

from attention import make_heights, make_inputs  # noqa: E402
from train_step import make_batch, make_config, make_step  # noqa: E402

from attention_topoflow import elevation_biased_attention  # noqa: E402
from modeling_topoflow import TopoFlowForForecasting  # noqa: E402

__all__ = ["main"]

H_SCALE_M = 1000.0
CLAMP_MAX = 10.0
Row = tuple[str, str, str, str]  # check, result, target, status


def run_cuda_tests(cuda: bool) -> Row:
    # Only the files that mention CUDA: collecting the whole suite takes minutes.
    tests = sorted((REPO_ROOT / "tests").glob("test_*.py"))
    files = [str(path.relative_to(REPO_ROOT)) for path in tests
             if "cuda" in path.read_text(encoding="utf-8")]  # fmt: skip
    command = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", *files]
    if not cuda:
        command.insert(3, "--collect-only")  # dry run: list what would run
    check = f"CUDA-only tests (pytest -k cuda {' '.join(files)})"
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return check, "timed out after 240 s", "all pass", "FAIL"
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    status = ("ok" if done.returncode == 0 else "FAIL") if cuda else "dry run"
    return check, last, "all pass", status


def attention_and_grads(
    implementation: str, tensors: list[torch.Tensor], heights: torch.Tensor, alpha_value: float
) -> list[torch.Tensor]:
    """Output and gradients of q, k, v and alpha of one implementation, as float64 on the CPU."""
    query, key, value, grad_out = (t.clone().requires_grad_(i < 3) for i, t in enumerate(tensors))
    alpha = torch.tensor(alpha_value, dtype=query.dtype, device=query.device, requires_grad=True)
    h_scale = torch.tensor(H_SCALE_M, dtype=query.dtype, device=query.device)
    out = elevation_biased_attention(
        query, key, value, elevation_m=heights.to(query), alpha=alpha, h_scale=h_scale,
        clamp_max=CLAMP_MAX, implementation=implementation,
    )  # fmt: skip
    out.backward(grad_out)
    return [t.detach().double().cpu() for t in (out, query.grad, key.grad, value.grad, alpha.grad)]


def check_exactness(device: str, implementation: str, shape: tuple[int, ...]) -> list[Row]:
    """Largest error over out, dq, dk, dv, dalpha against fp64 eager, next to fp32 eager's."""
    rows = []
    batch, heads, length, head_dim = shape
    for alpha_value in (2.0, 0.0):
        tensors = make_inputs(batch, heads, length, head_dim, torch.float64, seed=5)
        heights = make_heights(batch, length, seed=6)
        truth = attention_and_grads("eager", list(tensors), heights, alpha_value)
        single = [t.float().to(device) for t in tensors]
        ours = attention_and_grads(implementation, single, heights.to(device), alpha_value)
        yardstick = attention_and_grads("eager", single, heights.to(device), alpha_value)
        errors = [float((a - b).abs().max()) for a, b in zip(ours, truth, strict=True)]
        eager_errors = [float((a - b).abs().max()) for a, b in zip(yardstick, truth, strict=True)]
        worst = max(e / max(y, 1e-7) for e, y in zip(errors, eager_errors, strict=True))
        result = (f"max err out/dq/dk/dv/dalpha {'/'.join(f'{e:.1e}' for e in errors)}; "
                  f"<= {worst:.1f}x eager fp32's")  # fmt: skip
        status = "ok" if worst <= 4.0 else "FAIL"
        rows.append((f"{implementation} vs eager, {device}, N={length}, alpha={alpha_value}",
                     result, "<= 4x eager fp32 error", status))  # fmt: skip
    return rows


def median_time(steps: dict[str, Callable[[], None]], repeats: int, cuda: bool) -> dict[str, float]:
    """Median seconds of each step, the steps interleaved repeat by repeat."""
    for step in steps.values():
        step()  # warm-up (and FlexAttention's compilation)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(repeats):
        for name in list(steps) if repeat % 2 == 0 else reversed(list(steps)):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name]()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def check_attention_speed(device: str, shape: tuple[int, ...], repeats: int) -> list[Row]:
    batch, heads, length, head_dim = shape
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    query, key, value, grad_out = (
        t.to(device, dtype) for t in make_inputs(batch, heads, length, head_dim, dtype, seed=7)
    )
    heights = make_heights(batch, length, seed=8).float().to(device)
    alpha = torch.tensor(2.0, device=device, requires_grad=True)
    h_scale = torch.tensor(H_SCALE_M, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (query, key, value)]

    def training(function: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            for tensor in [*leaves, alpha]:
                tensor.grad = None
            function(*leaves).backward(grad_out)

        return step

    def biased(implementation: str) -> Callable[..., torch.Tensor]:
        return lambda q, k, v: elevation_biased_attention(
            q, k, v, elevation_m=heights, alpha=alpha, h_scale=h_scale, clamp_max=CLAMP_MAX,
            implementation=implementation,
        )  # fmt: skip

    steps = {"plain": training(F.scaled_dot_product_attention), "sdpa": training(biased("sdpa"))}
    if cuda:  # FlexAttention has no backward on CPU
        steps["flex_attention"] = training(biased("flex_attention"))
    median = median_time(steps, repeats, cuda)
    rows = []
    for name in steps:
        if name == "plain":
            continue
        ratio = median[name] / median["plain"]
        rows.append((f"{name} / plain flash, fwd+bwd, B={batch} h={heads} N={length} d={head_dim}",
                     f"{ratio:.2f}x ({median['plain'] * 1e3:.1f} ms plain)", "<= 1.3x",
                     ("ok" if ratio <= 1.3 else "over") if cuda else "dry run"))  # fmt: skip
    return rows


def check_train_step(device: str, size: str, batch_size: int, repeats: int) -> list[Row]:
    cuda = device == "cuda"
    rates, peaks = {}, {}
    for name, biased in (("baseline", False), ("topoflow", True)):
        torch.manual_seed(0)
        config = make_config(size, biased)
        model = TopoFlowForForecasting(config).to(device)
        batch = {k: v.to(device) for k, v in make_batch(config, batch_size, seed=1).items()}
        step = make_step(model, batch)

        def bf16_step(step: Callable[[], None] = step) -> None:
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
                step()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rates[name] = batch_size / median_time({name: bf16_step}, repeats, cuda)[name]
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        del model, batch, step
        if cuda:
            torch.cuda.empty_cache()
    ratio = rates["topoflow"] / rates["baseline"]
    return [(f"train step bf16, size {size}, batch {batch_size}, TopoFlow / baseline",
             f"{rates['topoflow']:.2f} / {rates['baseline']:.2f} samples/s = {ratio:.3f}x; "
             f"peak {peaks['topoflow']:.2f} / {peaks['baseline']:.2f} GiB", ">= 0.95x",
             ("ok" if ratio >= 0.95 else "under") if cuda else "dry run")]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    else:
        print(f"torch {torch.__version__}: no CUDA device. Dry run at small sizes on the CPU of "
              "everything that does not need the GPU; exit status 2.")  # fmt: skip
    started = time.perf_counter()
    rows = [run_cuda_tests(cuda)]
    exact_shape = (2, 4, 1024, 64) if cuda else (1, 2, 64, 16)
    rows += check_exactness(device, "sdpa", exact_shape)
    if cuda:
        rows += check_exactness(device, "flex_attention", exact_shape)
    for shape in [(8, 8, 2048, 96), (2, 8, 8192, 96)] if cuda else [(2, 2, 128, 16)]:
        rows += check_attention_speed(device, shape, args.repeats if cuda else 2)
    if cuda:
        rows += check_train_step(device, "reference", 8, 5)
    else:
        rows += check_train_step(device, "default", 2, 1)
    print("\n| check | result | target | status |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{time.perf_counter() - started:.0f} s")
    if not cuda:
        sys.exit(2)
    sys.exit(0 if all(row[3] == "ok" for row in rows) else 1)


if __name__ == "__main__":
    main()
