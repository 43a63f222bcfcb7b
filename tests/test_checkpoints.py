"""The checkpoint manager on a real single-process Accelerator: atomic layout, 'latest' picks the
newest complete checkpoint, and incomplete, corrupt or foreign checkpoints are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from topoflow.training.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    checkpoint_dir_name,
    find_complete_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)


@pytest.fixture
def prepared():
    """A prepared (model, optimizer, scheduler) on a fresh single-process Accelerator."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    yield accelerator, model, optimizer, scheduler
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _train_one_step(model, optimizer, scheduler) -> None:
    loss = model(torch.ones(4, 3)).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _save(accelerator, root: Path, step: int, limit: int = 2) -> Path:
    return save_checkpoint(accelerator, root, step, {"global_step": step},
                           {"epoch": 0, "dataset_state": {"shard_idx": step}}, total_limit=limit)


def test_save_is_complete_and_round_trips(prepared, tmp_path):
    accelerator, model, optimizer, scheduler = prepared
    _train_one_step(model, optimizer, scheduler)
    saved_weight = model.weight.detach().clone()
    path = _save(accelerator, tmp_path, 1)
    assert path.name == checkpoint_dir_name(1)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    assert marker["world_size"] == 1 and "optimizer.bin" in marker["files"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())

    _train_one_step(model, optimizer, scheduler)
    assert not torch.equal(model.weight, saved_weight)
    trainer_state, data_state = load_checkpoint(accelerator, path)
    assert torch.equal(model.weight, saved_weight)
    assert trainer_state == {"global_step": 1}
    assert data_state["dataset_state"] == {"shard_idx": 1}
    assert scheduler.scheduler.last_epoch == 1


def test_old_checkpoints_deleted_only_after_new_complete(prepared, tmp_path):
    accelerator, model, optimizer, scheduler = prepared
    for step in (1, 2, 3):
        _save(accelerator, tmp_path, step, limit=2)
    assert [step for step, _ in find_complete_checkpoints(tmp_path)] == [2, 3]


def test_latest_skips_incomplete_and_temporary_folders(prepared, tmp_path):
    accelerator, *_ = prepared
    _save(accelerator, tmp_path, 2)
    # A save killed before its marker (renamed by hand) and one killed before the rename.
    newer = tmp_path / checkpoint_dir_name(5)
    shutil.copytree(tmp_path / checkpoint_dir_name(2), newer)
    (newer / COMPLETE_MARKER).unlink()
    shutil.copytree(tmp_path / checkpoint_dir_name(2), tmp_path / ".tmp-checkpoint-00000007")
    assert resolve_checkpoint("latest", tmp_path).name == checkpoint_dir_name(2)
    with pytest.raises(CheckpointError, match="did not complete"):
        validate_checkpoint(newer, world_size=1)


def test_latest_without_any_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint("latest", tmp_path)


@pytest.mark.parametrize("name, meaning", [
    ("random_states_0.pkl", "RNG state"),
    ("data_state_rank0.json", "data-loader position"),
    ("optimizer.bin", "optimizer"),
    ("model.safetensors", "model weights"),
    ("scheduler.bin", "learning-rate scheduler"),
])
def test_missing_file_is_refused_by_name(prepared, tmp_path, name, meaning):
    accelerator, *_ = prepared
    path = _save(accelerator, tmp_path, 1)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=rf"missing {name}( or \w+)? \({meaning}"):
        load_checkpoint(accelerator, path)


def test_corrupt_file_is_refused(prepared, tmp_path):
    accelerator, *_ = prepared
    path = _save(accelerator, tmp_path, 1)
    weights = bytearray((path / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01  # one flipped bit in the last weight: safetensors itself would load it
    (path / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match="model.safetensors does not match the sha256"):
        validate_checkpoint(path, world_size=1)


def test_other_world_size_is_refused(prepared, tmp_path):
    accelerator, *_ = prepared
    path = _save(accelerator, tmp_path, 1)
    with pytest.raises(CheckpointError, match="written by 1 processes but this run has 2"):
        validate_checkpoint(path, world_size=2)
