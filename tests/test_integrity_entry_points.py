"""Integrity guards on every file the manifest covers, through `from_pretrained`, and the
manifest's refusal of paths that leave the model folder.

The older corruption tests damage `model.safetensors` only; a guard that hashed only weights would
pass them. A manifest line naming `/abs/path` or `../x` with the right digest would make the check
vouch for a file outside the folder; it must be refused as malformed, not verified.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import topoflow  # noqa: F401  (registers the name resolver that checks local folders)
from modeling_topoflow import TopoFlowForForecasting, verify_pretrained_files
from tests.fixtures_model import make_tiny_config
from topoflow.hub import resolve_model_name
from topoflow.safety import ManifestError, read_manifest, save_model_folder, sha256_file


@pytest.fixture
def saved_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = TopoFlowForForecasting(make_tiny_config(depth=2))
    return save_model_folder(model, tmp_path / "model")


def test_intact_folder_loads(saved_folder: Path) -> None:
    assert "config.json" in read_manifest(saved_folder)
    assert "modeling_topoflow.py" in read_manifest(saved_folder)
    TopoFlowForForecasting.from_pretrained(saved_folder)


def _edit_config(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["elevation_bias_clamp"] = 1000.0  # a plausible-looking edit that changes the model
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json"


def _edit_code(folder: Path) -> str:
    with open(folder / "modeling_topoflow.py", "a") as handle:
        handle.write("\n# an innocent-looking line\n")
    return "modeling_topoflow.py"


def _add_unlisted_code(folder: Path) -> str:
    (folder / "extra_module.py").write_text("import os\n")
    return "extra_module.py"


@pytest.mark.parametrize("damage", [_edit_config, _edit_code, _add_unlisted_code])
def test_from_pretrained_refuses_a_damaged_folder_naming_the_file(saved_folder, damage) -> None:
    name = damage(saved_folder)
    with pytest.raises(ManifestError, match=name.replace(".", r"\.")):
        TopoFlowForForecasting.from_pretrained(saved_folder)
    # Each of the two guards on its own: the model's check (runs without this package) and the
    # package's name resolver (also used for --model by the training script and the CLI).
    with pytest.raises(ManifestError, match=name.replace(".", r"\.")):
        verify_pretrained_files(saved_folder)
    with pytest.raises(ManifestError, match=name.replace(".", r"\.")):
        resolve_model_name(str(saved_folder))


@pytest.mark.parametrize("escape", ["absolute", "parent", "nested-parent"])
def test_manifest_paths_outside_the_folder_are_refused(saved_folder, tmp_path, escape) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    name = {"absolute": str(outside), "parent": "../outside.json",
            "nested-parent": "sub/../../outside.json"}[escape]
    manifest = saved_folder / "SHA256SUMS"
    with open(manifest, "a") as handle:
        handle.write(f"{sha256_file(outside)}  {name}\n")  # the right digest: only the path is bad
    with pytest.raises(ManifestError, match="malformed"):
        read_manifest(saved_folder)
    with pytest.raises(ManifestError, match="malformed"):
        TopoFlowForForecasting.from_pretrained(saved_folder)
