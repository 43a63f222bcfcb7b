"""Weight safety: checksum manifest, non-finite weights, pickle files (topoflow/safety.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from topoflow.safety import (
    MANIFEST_FILENAME,
    ManifestError,
    NonFiniteWeightsError,
    PickleFileError,
    check_finite_safetensors,
    check_finite_state_dict,
    read_manifest,
    verify_manifest,
    verify_model_folder,
    write_manifest,
)


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(16, 8, generator=generator),
        "encoder.bias": torch.zeros(16),
        "steps": torch.arange(4, dtype=torch.int64),
    }


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(_weights(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "topoflow"}))
    (folder / "modeling_topoflow.py").write_text("X = 1\n")
    (folder / "README.md").write_text("# card\n")
    return folder


def _flip_last_byte(path: Path) -> None:
    # The last byte belongs to the tensor data, not to the JSON header, so the file still parses.
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_weights_config_and_code_but_not_the_card(model_folder: Path) -> None:
    write_manifest(model_folder)
    assert set(read_manifest(model_folder)) == {
        "model.safetensors",
        "config.json",
        "modeling_topoflow.py",
    }
    verify_manifest(model_folder)
    # The card may be edited on the Hub without making the weights unloadable.
    (model_folder / "README.md").write_text("# edited in the browser\n")
    verify_manifest(model_folder)


def test_manifest_is_checkable_by_coreutils_sha256sum(model_folder: Path) -> None:
    if shutil.which("sha256sum") is None:
        pytest.fail("sha256sum (coreutils) is not on PATH")
    write_manifest(model_folder)
    ok = subprocess.run(["sha256sum", "-c", MANIFEST_FILENAME], cwd=model_folder, check=False)
    assert ok.returncode == 0
    _flip_last_byte(model_folder / "model.safetensors")
    bad = subprocess.run(
        ["sha256sum", "-c", MANIFEST_FILENAME], cwd=model_folder, capture_output=True, check=False
    )
    assert bad.returncode != 0


def test_flipped_weight_byte_loads_silently_but_fails_the_manifest_naming_the_file(
    model_folder: Path,
) -> None:
    write_manifest(model_folder)
    weight_file = model_folder / "model.safetensors"
    # Cloned: load_file memory-maps, and the flip below rewrites the same file in place.
    before = {key: tensor.clone() for key, tensor in load_file(weight_file).items()}
    _flip_last_byte(weight_file)
    after = load_file(weight_file)  # safetensors itself notices nothing
    assert any(not torch.equal(before[key], after[key]) for key in before)
    with pytest.raises(ManifestError, match=r"model\.safetensors: sha256 differs"):
        verify_manifest(model_folder)
    with pytest.raises(ManifestError, match=r"model\.safetensors"):
        verify_model_folder(model_folder)


def test_unlisted_code_and_missing_files_are_named(model_folder: Path) -> None:
    write_manifest(model_folder)
    (model_folder / "extra_code.py").write_text("import os\n")
    (model_folder / "config.json").unlink()
    with pytest.raises(ManifestError) as error:
        verify_manifest(model_folder)
    message = str(error.value)
    assert "extra_code.py: present but not listed" in message
    assert "config.json: listed in SHA256SUMS but missing" in message


def test_missing_or_malformed_manifest_is_refused(model_folder: Path) -> None:
    with pytest.raises(ManifestError, match="SHA256SUMS is missing"):
        verify_model_folder(model_folder)
    (model_folder / MANIFEST_FILENAME).write_text("not-a-digest  model.safetensors\n")
    with pytest.raises(ManifestError, match="line 1 is malformed"):
        verify_manifest(model_folder)


def test_nan_and_inf_weights_are_listed_by_key(tmp_path: Path) -> None:
    weights = _weights()
    weights["encoder.weight"][3, 2] = float("nan")
    weights["decoder.bias"] = torch.tensor([0.0, float("inf")])
    with pytest.raises(NonFiniteWeightsError) as error:
        check_finite_state_dict(weights, where="tiny model")
    message = str(error.value)
    assert "tiny model" in message
    assert "encoder.weight" in message and "decoder.bias" in message
    assert "encoder.bias" not in message
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(NonFiniteWeightsError) as error:
        check_finite_safetensors(tmp_path / "model.safetensors")
    message = str(error.value)
    assert "encoder.weight" in message and "decoder.bias" in message
    assert "encoder.bias" not in message and "steps" not in message


def test_nan_weights_in_a_folder_are_refused_at_load_even_with_a_valid_manifest(
    model_folder: Path,
) -> None:
    weights = _weights()
    weights["encoder.bias"][0] = float("nan")
    save_file(weights, model_folder / "model.safetensors")
    write_manifest(model_folder)  # the checksum is right; the values are not
    with pytest.raises(NonFiniteWeightsError, match="encoder.bias"):
        verify_model_folder(model_folder)


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "weights.pt", "model.ckpt"])
def test_pickle_model_files_are_refused(model_folder: Path, pickle_name: str) -> None:
    torch.save(_weights(), model_folder / pickle_name)
    with pytest.raises(PickleFileError, match=pickle_name.replace(".", r"\.")):
        write_manifest(model_folder)
    with pytest.raises(PickleFileError, match=pickle_name.replace(".", r"\.")):
        verify_model_folder(model_folder, require_manifest=False)
