"""Weight safety for model folders: sha256 manifest, finite weights, no pickle files.

The manifest, finite-weight and pickle checks themselves live in the Hub file modeling_topoflow.py
(so `from_pretrained` and `save_pretrained` run them even where this package is not installed);
this module re-exports them and adds the folder-level checks of the library.

safetensors stores no checksum, so a flipped byte in a weight file loads silently as a slightly
different number. A model folder therefore carries a ``SHA256SUMS`` manifest in the format of
coreutils' ``sha256sum`` (``<hex>  <relative path>`` per line), so ``sha256sum -c SHA256SUMS``
checks it without Python.

The manifest covers the files that decide what a load produces: weights (``*.safetensors``),
configuration and metadata (``*.json``) and remote code (``*.py``). Documentation (README.md, PNGs)
is left out on purpose: the Hub lets people edit a model card in the browser, and such an edit must
not make the weights unloadable.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from modeling_topoflow import (
    COVERED_SUFFIXES,
    MANIFEST_FILENAME,
    PICKLE_SUFFIXES,
    ManifestError,
    NonFiniteWeightsError,
    PickleFileError,
    check_finite_state_dict,
    find_pickle_files,
    nonfinite_keys,
    read_manifest,
    refuse_nonfinite_keys,
    refuse_pickle_files,
    sha256_file,
    verify_manifest,
    write_manifest,
)

__all__ = [
    "MANIFEST_FILENAME",
    "PICKLE_SUFFIXES",
    "COVERED_SUFFIXES",
    "ManifestError",
    "NonFiniteWeightsError",
    "PickleFileError",
    "sha256_file",
    "write_manifest",
    "read_manifest",
    "verify_manifest",
    "find_pickle_files",
    "refuse_pickle_files",
    "nonfinite_keys",
    "check_finite_state_dict",
    "check_finite_safetensors",
    "verify_model_folder",
    "save_model_folder",
]


def check_finite_safetensors(path: str | os.PathLike) -> None:
    """Raise NonFiniteWeightsError listing the keys of a .safetensors file with NaN or Inf values.

    Tensors are read one at a time so a large checkpoint never sits in memory whole.
    """
    bad = []
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            tensor = handle.get_tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    refuse_nonfinite_keys(bad, f"weight file {path}")


def verify_model_folder(folder: str | os.PathLike, *, require_manifest: bool = True) -> Path:
    """Check a model folder before loading it: no pickle files, manifest matches (when present,
    or always with `require_manifest`), every safetensors file finite. Returns the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    refuse_pickle_files(folder)
    if require_manifest or (folder / MANIFEST_FILENAME).is_file():
        verify_manifest(folder)
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"model folder {folder} holds no *.safetensors weight file")
    for path in weight_files:
        check_finite_safetensors(path)
    return folder


def save_model_folder(model: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """`model.save_pretrained(folder)`, which refuses non-finite weights before anything is
    written and writes SHA256SUMS (modeling_topoflow.py); then refuses a result holding pickle
    files. Returns the folder."""
    model.save_pretrained(folder)
    refuse_pickle_files(folder)
    return Path(folder)
