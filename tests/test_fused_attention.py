"""The fused C++ CPU kernel (issue 17) equals the eager reference, and its absence is loud.

fp64 where exactness is claimed: outputs and the gradients of q, k, v and alpha within 1e-12 of
eager, tied heights, the clamp-active case, alpha < 0 and N = 1..3 included. The kernel must build
here (CI installs a compiler and ninja): these tests fail rather than skip when it cannot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attention_topoflow
from attention_topoflow import (
    eager_elevation_attention,
    elevation_biased_attention,
    fused_elevation_attention,
)
from tests.test_dense_attention import _run_with_height_grads
from tests.test_fast_attention import (
    CLAMP_MAX,
    H_SCALE_M,
    _assert_all_close,
    _heights,
    _inputs,
    _run,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_kernel_builds_here() -> None:
    assert attention_topoflow.fused_kernel_available(), "see the RuntimeWarning for what is missing"


@pytest.mark.parametrize("alpha_value", [2.0, 0.0, 6.0, -0.5])
def test_fused_matches_eager_in_fp64(alpha_value: float) -> None:
    # 6.0 clamps biases of up to 24 logits at 10; -0.5 makes the clamp zero the whole bias.
    tensors = _inputs(2, 3, 75, 16, seed=20)
    heights = _heights(2, 75, seed=21)
    reference = _run(eager_elevation_attention, tensors, heights, alpha_value)
    _assert_all_close(_run(fused_elevation_attention, tensors, heights, alpha_value), reference,
                      atol=1e-12)  # fmt: skip
    if alpha_value >= 0:
        assert float(reference[4].abs()) > 1e-3  # alpha's gradient is not trivially zero


@pytest.mark.parametrize("length", [1, 2, 3, 600])
def test_fused_tiny_and_tiled_lengths(length: int) -> None:
    # 600 tokens: 64-row query blocks and two key tiles (512 + 88), the online softmax's merge.
    tensors = _inputs(1, 2, length, 8, seed=22)
    heights = _heights(1, length, seed=23)
    reference = _run(eager_elevation_attention, tensors, heights, 1.5)
    _assert_all_close(_run(fused_elevation_attention, tensors, heights, 1.5), reference, 1e-12)


def test_fused_at_the_clamp_boundary_passes_alpha_gradient() -> None:
    # alpha * (5000 - 0) / 1000 = 10 = clamp_max exactly: torch.clamp passes the gradient there.
    tensors = _inputs(1, 2, 3, 8, seed=24)
    heights = torch.tensor([[0.0, 1000.0, 5000.0]], dtype=torch.float64)
    reference = _run(eager_elevation_attention, tensors, heights, 2.0)
    _assert_all_close(_run(fused_elevation_attention, tensors, heights, 2.0), reference, 1e-12)


def test_fused_reads_the_models_strided_layout() -> None:
    # q, k, v as the model's fused qkv projection lays them out: (B, N, 3, h, d) permuted.
    batch, heads, length, dim = 2, 4, 40, 8
    generator = torch.Generator().manual_seed(25)
    qkv = torch.randn(batch, length, 3, heads, dim, generator=generator, dtype=torch.float64)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    grad_out = torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64)
    tensors = [query, key, value, grad_out]
    heights = _heights(batch, length, seed=26)
    reference = _run(eager_elevation_attention, tensors, heights, 1.0)
    _assert_all_close(_run(fused_elevation_attention, tensors, heights, 1.0), reference, 1e-12)


def test_fused_fp32_and_bf16_stay_near_fp64() -> None:
    tensors = _inputs(2, 4, 130, 32, seed=27)
    heights = _heights(2, 130, seed=28)
    reference = _run(eager_elevation_attention, tensors, heights, 2.0)
    single = _run(fused_elevation_attention, [t.float() for t in tensors], heights, 2.0)
    _assert_all_close(single, reference, atol=2e-5)
    half = _run(fused_elevation_attention, [t.bfloat16() for t in tensors], heights, 2.0)
    assert all(t.dtype == torch.bfloat16 for t in half[:4])
    assert float((half[0].double() - reference[0]).abs().max()) < 3e-2


def test_sdpa_takes_the_fused_kernel_on_cpu() -> None:
    tensors = _inputs(2, 2, 50, 8, seed=29)
    heights = _heights(2, 50, seed=30)
    fused = _run(fused_elevation_attention, tensors, heights, 1.0)

    def sdpa(*args, **kwargs) -> torch.Tensor:
        return elevation_biased_attention(*args, implementation="sdpa", **kwargs)

    for got, want in zip(_run(sdpa, tensors, heights, 1.0), fused, strict=True):
        assert torch.equal(got, want)


def test_sdpa_with_height_gradients_uses_an_exact_path_that_returns_them() -> None:
    # The fused kernel treats heights and H_scale as constants: sdpa must route around it.
    tensors = _inputs(1, 2, 30, 8, seed=31)
    heights = _heights(1, 30, seed=32)

    def sdpa(*args, **kwargs) -> torch.Tensor:
        return elevation_biased_attention(*args, implementation="sdpa", **kwargs)

    got = _run_with_height_grads(sdpa, tensors, heights, 1.0)
    want = _run_with_height_grads(eager_elevation_attention, tensors, heights, 1.0)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dalpha", "dz", "dH"], got, want, strict=True):
        assert a is not None and float((a - b).abs().max()) <= 1e-10, name


def test_fused_memory_is_linear_in_length() -> None:
    # No N x N tensor: the largest allocation of forward + backward at N = 2048 is O(N * d).
    query, key, value, grad_out = _inputs(1, 2, 2048, 16, seed=33, dtype=torch.float32)
    leaves = [t.requires_grad_(True) for t in (query, key, value)]
    heights = _heights(1, 2048, seed=34).float()
    alpha = torch.tensor(1.0, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profile:  # fmt: skip
        out = fused_elevation_attention(*leaves, elevation_m=heights, alpha=alpha,
                                        h_scale=H_SCALE_M, clamp_max=CLAMP_MAX)  # fmt: skip
        out.backward(grad_out)
    largest = max(event.cpu_memory_usage for event in profile.events())
    assert largest <= 4 * 2048 * 2 * 16 * 4, f"largest allocation {largest} bytes"


FALLBACK_CHILD = textwrap.dedent(
    """
    import warnings, torch
    import attention_topoflow as attention
    from tests.test_fast_attention import _heights, _inputs, _run

    tensors, heights = _inputs(1, 2, 20, 8, seed=35), _heights(1, 20, seed=36)
    def sdpa(*args, **kwargs):
        return attention.elevation_biased_attention(*args, implementation="sdpa", **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = _run(sdpa, tensors, heights, 1.0), _run(sdpa, tensors, heights, 1.0)
    reference = _run(attention.eager_elevation_attention, tensors, heights, 1.0)
    assert all(float((a - b).abs().max()) <= 1e-12 for a, b in zip(first, reference))
    messages = [str(w.message) for w in caught if "fused CPU attention" in str(w.message)]
    print(len(messages))
    print(messages[0] if messages else "")
    """
)


def _fallback_run(tmp_path: Path, compiler: str) -> tuple[str, str]:
    """(number of kernel warnings, the first) of two sdpa calls in a fresh process whose extension
    cache is empty and whose $CXX is `compiler`; the results must equal eager's."""
    environment = {**os.environ, "CXX": compiler,
                   "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
                   "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", FALLBACK_CHILD], env=environment,
                            cwd=REPO_ROOT, capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    count, message = result.stdout.strip().splitlines()[-2:]
    return count, message


def test_missing_compiler_falls_back_with_one_warning(tmp_path: Path) -> None:
    count, message = _fallback_run(tmp_path, str(tmp_path / "no-such-compiler"))
    assert count == "1"
    assert "no-such-compiler" in message and "no C++ compiler" in message


def test_failing_build_falls_back_with_one_warning(tmp_path: Path) -> None:
    # A "compiler" that exists but fails every command: the build itself fails.
    count, message = _fallback_run(tmp_path, shutil.which("false") or "/bin/false")
    assert count == "1"
    assert "build failed" in message
