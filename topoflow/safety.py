"""Weight safety for model folders: sha256 manifest, finite weights, no pickle files.

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

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

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

MANIFEST_FILENAME = "SHA256SUMS"
COVERED_SUFFIXES = (".safetensors", ".json", ".py")
# Formats that torch.load / pickle would deserialize; loading one can execute arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CHUNK_BYTES = 1 << 20


class ManifestError(ValueError):
    """A model folder's SHA256SUMS is missing, malformed, or does not match the files."""


class NonFiniteWeightsError(ValueError):
    """A state dict or weight file holds NaN or Inf values."""


class PickleFileError(ValueError):
    """A model folder holds a pickle-based weight file, which this project never loads."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB shards do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _visible_files(folder: Path) -> list[Path]:
    """Regular files under `folder`, relative, skipping hidden entries such as `.git` or the
    `.cache` that `snapshot_download(local_dir=...)` creates."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            found.append(relative)
    return found


def _covered_files(folder: Path) -> list[Path]:
    return [p for p in _visible_files(folder) if p.suffix in COVERED_SUFFIXES]


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write `folder`/SHA256SUMS over every weight, json and Python file; return its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write a manifest: model folder {folder} does not exist")
    refuse_pickle_files(folder)
    lines = [f"{sha256_file(folder / rel)}  {rel.as_posix()}\n" for rel in _covered_files(folder)]
    if not any(line.rstrip().endswith(".safetensors") for line in lines):
        raise ManifestError(f"model folder {folder} holds no *.safetensors weight file")
    manifest = folder / MANIFEST_FILENAME
    temporary = manifest.with_name(MANIFEST_FILENAME + ".tmp")
    temporary.write_text("".join(lines), encoding="utf-8")
    os.replace(temporary, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """Parse `folder`/SHA256SUMS into {relative posix path: hex digest}."""
    manifest = Path(folder) / MANIFEST_FILENAME
    if not manifest.is_file():
        raise ManifestError(
            f"{manifest} is missing: the weights cannot be checked (write it with "
            "topoflow.safety.write_manifest, or export the model with python -m topoflow.export)"
        )
    entries: dict[str, str] = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        # No absolute path and no `..` anywhere ("sub/../../x" leaves the folder too).
        parts = PurePosixPath(name).parts
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in parts:
            raise ManifestError(f"{manifest} line {number} is malformed: {line!r}")
        entries[name] = digest.lower()
    return entries


def verify_manifest(folder: str | os.PathLike) -> None:
    """Raise ManifestError naming every file whose bytes differ from SHA256SUMS, every listed
    file that is missing, and every weight/json/code file that the manifest does not list."""
    folder = Path(folder)
    expected = read_manifest(folder)
    problems = []
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST_FILENAME} but missing")
        elif sha256_file(path) != digest:
            problems.append(
                f"{name}: sha256 differs from {MANIFEST_FILENAME} (file corrupted or altered)"
            )
    for rel in _covered_files(folder):
        if rel.as_posix() not in expected:
            problems.append(f"{rel.as_posix()}: present but not listed in {MANIFEST_FILENAME}")
    if problems:
        raise ManifestError(
            f"model folder {folder} fails its checksum manifest:\n  " + "\n  ".join(problems)
        )


def find_pickle_files(folder: str | os.PathLike) -> list[str]:
    """Relative paths of pickle-format files (`.bin`, `.pt`, ...) in `folder`."""
    folder = Path(folder)
    return [rel.as_posix() for rel in _visible_files(folder) if rel.suffix in PICKLE_SUFFIXES]


def refuse_pickle_files(folder: str | os.PathLike) -> None:
    """Raise PickleFileError if `folder` holds any pickle-format file."""
    found = find_pickle_files(folder)
    if found:
        raise PickleFileError(
            f"model folder {folder} holds pickle-format files {found}; TopoFlow loads and writes "
            "safetensors only (unpickling can run arbitrary code). Convert them to safetensors."
        )


def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding any NaN or Inf, in the mapping's order."""
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def _raise_nonfinite(keys: Iterable[str], where: str) -> None:
    keys = list(keys)
    if keys:
        shown = ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")
        raise NonFiniteWeightsError(f"{where} holds NaN or Inf weights in: {shown}")


def check_finite_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, where: str = "state dict"
) -> None:
    """Raise NonFiniteWeightsError listing every key of `state_dict` with NaN or Inf values."""
    _raise_nonfinite(nonfinite_keys(state_dict), where)


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
    _raise_nonfinite(bad, f"weight file {path}")


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
    """`model.save_pretrained(folder)` guarded: refuses non-finite weights before anything is
    written, refuses a result holding pickle files, and writes SHA256SUMS. Returns the folder."""
    state_dict = model.state_dict()
    check_finite_state_dict(state_dict, where=f"model {type(model).__name__}")
    model.save_pretrained(folder)
    folder = Path(folder)
    refuse_pickle_files(folder)
    write_manifest(folder)
    return folder
