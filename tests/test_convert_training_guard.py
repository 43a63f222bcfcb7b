"""A partial conversion written with --allow-missing is refused by train_accelerate.py itself (a
real run on the synthetic corpus), like any other checkpoint with missing keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.reference_climax import climax_state_dict
from topoflow.convert_climax import convert_climax_checkpoint
from topoflow.corpus.schema import CorpusMetadata
from topoflow.training.model_setup import build_from_scratch_config

REPO = Path(__file__).resolve().parents[1]


def test_train_accelerate_refuses_a_partial_conversion(synthetic_corpus, tmp_path):
    meta = CorpusMetadata.load(synthetic_corpus)  # a 4 x 6 grid
    architecture = {"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2}
    (tmp_path / "architecture.json").write_text(json.dumps(architecture))
    config = build_from_scratch_config(
        str(tmp_path / "architecture.json"),
        meta,
        elevation_blocks=[],
        elevation_scale=1000.0,
        alpha_init=0.0,
    )
    state = climax_state_dict(config, grouped=True, variables=list(config.variables))
    state = {key: value for key, value in state.items() if not key.startswith("var_agg.")}
    torch.save({"state_dict": state}, tmp_path / "partial.ckpt")
    report = convert_climax_checkpoint(
        tmp_path / "partial.ckpt", tmp_path / "converted", config, allow_missing=True
    )
    assert report.missing and all("var_agg" in key for key in report.missing)

    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "train_accelerate.py", "--model", str(tmp_path / "converted"),
         "--corpus", str(synthetic_corpus), "--output-dir", str(out), "--max-steps", "1",
         "--no-progress-bar", "--report-to", "none"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip

    assert done.returncode != 0
    assert "are missing or mismatched" in done.stderr  # MissingKeysError's message
    assert "var_agg.in_proj_weight" in done.stderr
    assert not (out / "model").exists()
