"""The packaged topoflow-base folder is a complete, current Hub model repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from topoflow.safety import verify_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGED = REPO_ROOT / "topoflow" / "pretrained" / "topoflow-base"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packaged_hub_files_are_the_current_ones(implementation: str) -> None:
    # A stale copy would make trust_remote_code users run other model code than `import topoflow`.
    # Compared by behaviour, not bytes: the packaged code (loaded the Hub way) and the repository
    # code load the same weights with two biased blocks whose clamp is active, and must forecast
    # the same. A byte comparison fails on any edit and invites copying the file over, which would
    # ship a bug; this fails only when the two codes compute different things.
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from modeling_topoflow import TopoFlowForForecasting
    from tests.fixtures_model import make_tiny_batch

    overrides = {"elevation_bias_blocks": [0, 1], "elevation_alpha_init": 3.0,
                 "attn_implementation": implementation}
    # transformers' remote-code loader imports the packaged file as its own module (the Auto
    # classes would pick the registered local class, since `import topoflow` registers it).
    hub_class = get_class_from_dynamic_module(
        "modeling_topoflow.TopoFlowForForecasting", str(PACKAGED))
    hub_code = hub_class.from_pretrained(PACKAGED, **overrides).eval()
    repo_code = TopoFlowForForecasting.from_pretrained(PACKAGED, **overrides).eval()
    assert type(hub_code).__module__ != type(repo_code).__module__  # really two codes
    batch = make_tiny_batch(repo_code.config)
    with torch.no_grad():
        expected = repo_code(**batch)
        packaged = hub_code(**batch)
    assert torch.isfinite(expected.forecast).all()
    torch.testing.assert_close(packaged.forecast, expected.forecast, atol=1e-5, rtol=1e-5, msg=(
        f"{PACKAGED}/modeling_topoflow.py or configuration_topoflow.py computes other forecasts "
        "than the repository code. Do not copy the files over to silence this: first check the "
        "repository code against the independent derivations (tests/test_attention_regimes.py, "
        "tests/test_model_golden_by_hand.py); only an intended, checked change is re-exported "
        "(python -m topoflow.export) with a new manifest."))
    torch.testing.assert_close(packaged.loss, expected.loss)


def test_packaged_folder_is_complete_and_its_manifest_holds() -> None:
    for name in ("config.json", "model.safetensors", "README.md", "SHA256SUMS"):
        assert (PACKAGED / name).is_file(), f"{PACKAGED / name} is missing"
    verify_manifest(PACKAGED)
