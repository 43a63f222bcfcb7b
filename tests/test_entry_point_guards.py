"""Safety rules exercised through the entry points users call, not only as helper functions.

The trainer's alpha >= 0 projection is driven through `train_accelerate.py` in a subprocess; the
loading report gets real `from_pretrained` loading info with missing and mismatched keys; the
trainable selection is checked for what it freezes as well as what it keeps.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_accelerate
from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_config
from topoflow.training.args import parse_args
from topoflow.training.model_setup import MissingKeysError, make_loading_report, select_trainable

REPO = Path(__file__).resolve().parents[1]
TINY = {"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
        "decoder_depth": 2, "drop_path": 0.0, "drop_rate": 0.0}


def test_training_script_keeps_alpha_at_zero_when_a_step_pushes_it_below(synthetic_corpus,
                                                                         tmp_path):
    # Below 0 alpha gets exactly zero gradient (the clamp at 0 zeroes the whole bias), so only the
    # trainer's projection after each optimizer step keeps the logged (and saved) alpha >= 0; the
    # model's own projection acts only at the next training forward. On this corpus the upslope
    # bias makes the loss push alpha down from 0, and an alpha learning rate of 100 turns each
    # Adam step into a move of about 100.
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "train_accelerate.py"), "--from-scratch",
               "--config", str(config), "--corpus", str(synthetic_corpus),
               "--output-dir", str(out), "--max-steps", "2", "--eval-every", "2",
               "--batch-size", "4", "--eval-batch-size", "8", "--eval-batches", "1",
               "--no-progress-bar", "--report-to", "none", "--elevation-blocks", "0,1",
               "--alpha-init", "0", "--elevation-direction", "upslope",
               "--alpha-learning-rate", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "train_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    alphas = [float(row[column]) for row in rows for column in ("alpha_block0", "alpha_block1")]
    assert min(alphas) >= 0.0, alphas
    # Proof that the run exercised the guard: an alpha that went up would read about 100.
    assert 0.0 in alphas, f"no step pushed alpha below 0 on this fixture: {alphas}"
    final = json.loads((out / "report.json").read_text())["run"]["final_alpha"]
    assert set(final) == {"0", "1"} and min(final.values()) >= 0.0


@pytest.fixture(scope="module")
def saved_baseline(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("baseline") / "model"
    TopoFlowForForecasting(make_tiny_config(depth=2)).save_pretrained(folder)
    return folder


def test_loading_report_stops_on_mismatched_keys_from_a_real_load(saved_baseline):
    # The same checkpoint loaded with wider MLPs: same key names, other shapes. transformers
    # reports them as mismatched (and leaves them random); the report must refuse that.
    _, info = TopoFlowForForecasting.from_pretrained(
        saved_baseline, mlp_ratio=4.0, ignore_mismatched_sizes=True, output_loading_info=True)
    assert info["mismatched_keys"] and not info["missing_keys"]
    with pytest.raises(MissingKeysError, match="missing or mismatched"):
        make_loading_report(info, [], model_name=str(saved_baseline), allow_missing=False)
    report = make_loading_report(info, [], model_name="x", allow_missing=True)
    assert report.mismatched and report.missing_other == []
    assert all(".mlp." in key for key in report.mismatched)


def test_loading_report_accepts_only_the_new_bias_keys(saved_baseline):
    _, info = TopoFlowForForecasting.from_pretrained(
        saved_baseline, elevation_bias_blocks=[1], output_loading_info=True)
    report = make_loading_report(info, [1], model_name="x", allow_missing=False)
    assert sorted(key.split("blocks.")[-1] for key in report.missing_expected) == [
        "1.attn.H_scale", "1.attn.elevation_alpha"]
    assert report.missing_other == [] and report.mismatched == []


def test_training_script_refuses_a_checkpoint_missing_a_weight(saved_baseline, tmp_path):
    # A checkpoint without one block's MLP, loaded the way train_accelerate.py loads --model.
    model = TopoFlowForForecasting.from_pretrained(saved_baseline)
    state = {k: v for k, v in model.state_dict().items() if ".blocks.1.mlp." not in k}
    broken = tmp_path / "broken"
    model.save_pretrained(broken, state_dict=state)
    args = parse_args(["--model", str(broken), "--output-dir", str(tmp_path / "out"),
                       "--elevation-blocks", "0"])
    with pytest.raises(MissingKeysError, match=r"blocks\.1\.mlp"):
        train_accelerate.load_model(args, None, None)


@pytest.fixture(scope="module")
def biased_model() -> TopoFlowForForecasting:
    torch.manual_seed(0)
    return TopoFlowForForecasting(make_tiny_config(depth=3, elevation_bias_blocks=[1]))


@pytest.mark.parametrize("mode", ["all", "head", "bias-blocks", "elevation", "prefix:head."])
def test_trainable_selection_trains_exactly_what_it_names(biased_model, mode):
    names = [name for name, _ in biased_model.named_parameters()]
    rule = {
        "all": lambda name: True,
        "head": lambda name: name.startswith("head."),
        "bias-blocks": lambda name: name.startswith("topoflow.blocks.1."),
        "elevation": lambda name: name == "topoflow.blocks.1.attn.elevation_alpha",
        "prefix:head.": lambda name: name.startswith("head."),
    }[mode]
    for _, param in biased_model.named_parameters():
        param.requires_grad_(mode != "all")  # start from the opposite of what "all" must give
    chosen = select_trainable(biased_model, mode, new_keys=[], blocks=[1])
    expected = {name for name in names if rule(name)}
    assert expected and set(chosen) == expected
    trainable = {n for n, p in biased_model.named_parameters() if p.requires_grad}
    assert trainable == expected
    if mode != "all":
        assert len(trainable) < len(names)  # something is frozen
