"""Atomic, verifiable training checkpoints on top of `Accelerator.save_state` / `load_state`.

A checkpoint is written into `<root>/.tmp-checkpoint-<step>`, every file is fsynced, a completion
marker (`checkpoint_complete.json`, listing every file with its size and sha256) is written last,
and only then the main rank renames the folder to `<root>/checkpoint-<step>` after a barrier. A
folder without the marker, or under a temporary name, is never resumed from. Older checkpoints are
deleted only after the new one is complete. A job killed at any instant therefore leaves the newest
complete checkpoint untouched.

Resuming checks, before anything is loaded, that every file a faithful resume needs is there (model,
optimizer, scheduler, the RNG state and data-loader position of every rank, the trainer state) and
matches the marker's checksum, and refuses with the name of the first file at fault: a resume that
silently restarted the data from the beginning or with fresh RNG state would be wrong, not slow.

Checkpoints need a file system shared by all ranks (each rank writes its own RNG and data files),
as on any cluster that runs multi-node jobs. Resuming with a different number of processes is
refused: each rank's data position belongs to the shards that rank was reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPLETE_MARKER",
    "TRAINER_STATE_FILE",
    "CheckpointError",
    "checkpoint_dir_name",
    "data_state_file",
    "find_complete_checkpoints",
    "load_checkpoint",
    "required_files",
    "resolve_checkpoint",
    "save_checkpoint",
    "validate_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "checkpoint_complete.json"
TRAINER_STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
# Test-only hook: when set to a step number, the save of that step pauses (after the state files are
# written, before the marker and rename) so a test can SIGKILL the process in the middle of a save.
PAUSE_ENV = "TOPOFLOW_TEST_PAUSE_IN_SAVE_AT_STEP"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not fit the current run."""


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def data_state_file(rank: int) -> str:
    return f"data_state_rank{rank}.json"


def required_files(world_size: int) -> dict[str, str]:
    """Entry name -> what it holds, for each entry a resume with `world_size` ranks needs.

    A name with "|" lists alternatives: FSDP with sharded state dicts writes folders
    (`pytorch_model_fsdp_0/`, `optimizer_0/`) where DDP and single-process runs write files.
    """
    files = {
        "model.safetensors|pytorch_model_fsdp_0": "model weights",
        "optimizer.bin|optimizer_0": "optimizer state (AdamW moments)",
        "scheduler.bin": "learning-rate scheduler state",
        TRAINER_STATE_FILE: "step counters and logged history",
    }
    for rank in range(world_size):
        files[f"random_states_{rank}.pkl"] = f"RNG state of rank {rank}"
        files[data_state_file(rank)] = f"data-loader position of rank {rank}"
    return files


def _present(folder: Path, name: str) -> bool:
    return any((folder / option).exists() for option in name.split("|"))


def _files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, payload: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, default=_json_default)
        handle.flush()
        os.fsync(handle.fileno())


def _json_default(value: Any) -> Any:
    # Dataset positions may hold numpy integers; anything else unexpected should fail loudly.
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint JSON file")


def _pause_for_tests(step: int) -> None:
    if os.environ.get(PAUSE_ENV) == str(step):
        print(f"TOPOFLOW_TEST: paused in save of step {step}", flush=True, file=sys.stderr)
        time.sleep(3600)


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    step: int,
    trainer_state: dict[str, Any],
    data_state: dict[str, Any],
    total_limit: int,
) -> Path:
    """Collectively save a checkpoint of step `step`; every rank must call this.

    `trainer_state` (identical on all ranks) is written by the main rank; `data_state` is this
    rank's data-loader position. Returns the final folder.
    """
    root = Path(root)
    tmp = root / f"{TMP_PREFIX}{checkpoint_dir_name(step)}"
    final = root / checkpoint_dir_name(step)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        _write_json(tmp / data_state_file(accelerator.process_index), data_state)
    except (OSError, RuntimeError) as err:
        # torch's writer reports a full disk as "inline_container.cc:... unexpected pos".
        raise CheckpointError(_save_failure(tmp, step, err)) from err
    for path in tmp.iterdir():
        if path.name.endswith(f"_{accelerator.process_index}.pkl"):
            _fsync_file(path)
    _pause_for_tests(step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / TRAINER_STATE_FILE, trainer_state)
        _commit(tmp, final, step, accelerator.num_processes)
        _delete_old(root, keep=total_limit)
    accelerator.wait_for_everyone()
    return final


def _save_failure(tmp: Path, step: int, err: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(tmp.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return (f"saving the checkpoint of step {step} into {tmp} failed ({free} on that file "
            f"system; a full disk or quota?): {err}. Earlier complete checkpoints are untouched; "
            "free space and resume with --resume-from-checkpoint latest")


def _commit(tmp: Path, final: Path, step: int, world_size: int) -> None:
    missing = [name for name in required_files(world_size) if not _present(tmp, name)]
    if missing:
        raise CheckpointError(
            f"checkpoint of step {step} in {tmp} lacks {missing} after all ranks saved; is "
            "the output dir on a file system shared by all ranks?"
        )
    files = {}
    for path in _files_under(tmp):
        _fsync_file(path)
        files[path.relative_to(tmp).as_posix()] = {"size": path.stat().st_size,
                                                   "sha256": _sha256(path)}
    marker = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, "files": files}
    _write_json(tmp / COMPLETE_MARKER, marker)
    _fsync_dir(tmp)
    if final.exists():
        # Re-saving a step that already has a checkpoint (resumed from an older one): move the old
        # one aside first, because rename cannot replace a non-empty folder.
        aside = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def _delete_old(root: Path, keep: int) -> None:
    complete = find_complete_checkpoints(root)
    for _, path in complete[:-keep]:
        shutil.rmtree(path)
    for path in root.iterdir():
        # Leftovers of saves that were killed: never complete, safe to drop once a newer one is.
        if path.name.startswith(TMP_PREFIX) and path.is_dir():
            shutil.rmtree(path)


def find_complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not path.name.startswith(CHECKPOINT_PREFIX) or not (path / COMPLETE_MARKER).is_file():
            continue
        try:
            found.append((int(path.name[len(CHECKPOINT_PREFIX):]), path))
        except ValueError:
            continue
    return sorted(found)


def resolve_checkpoint(spec: str, root: Path) -> Path:
    """Turn `--resume-from-checkpoint` (a folder or 'latest') into a checkpoint folder."""
    if spec == "latest":
        complete = find_complete_checkpoints(root)
        if not complete:
            raise CheckpointError(f"--resume-from-checkpoint latest: no complete checkpoint in "
                                  f"{root} (folders without {COMPLETE_MARKER} are ignored)")
        return complete[-1][1]
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"--resume-from-checkpoint {spec}: no such folder")
    return path


def validate_checkpoint(path: Path, world_size: int) -> dict[str, Any]:
    """Check `path` is complete, intact and fits `world_size` ranks; return its marker."""
    path = Path(path)
    marker_path = path / COMPLETE_MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {COMPLETE_MARKER}: the save did not "
                              "complete; resume from an earlier one (or 'latest')")
    marker = _read_marker(marker_path)
    if marker["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {marker['world_size']} processes but this run "
            f"has {world_size}; resuming with another world size is refused because each rank's "
            "data position belongs to its own shards"
        )
    for name, meaning in required_files(world_size).items():
        if not _present(path, name):
            shown = name.replace("|", " or ")
            raise CheckpointError(f"checkpoint {path} is missing {shown} ({meaning}); refusing "
                                  "to resume from it")
    unlisted = [rel for rel in (f.relative_to(path).as_posix() for f in _files_under(path))
                if rel != COMPLETE_MARKER and rel not in marker["files"]]
    if unlisted:
        raise CheckpointError(f"checkpoint {path}: {unlisted[:5]} not listed in {COMPLETE_MARKER}; "
                              "its files cannot be checked, refusing to resume from it")
    for name, expected in marker["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name} listed in its marker")
        if file.stat().st_size != expected["size"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match the sha256 in "
                                  f"{COMPLETE_MARKER}; the file is corrupt")
    return marker


def _read_marker(marker_path: Path) -> dict[str, Any]:
    """The completion marker, checked field by field: a marker that lists no file would let a
    resume skip every sha256 check."""
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{marker_path}: unreadable completion marker ({err}); refusing to "
                              "resume from this checkpoint") from err
    problem = _marker_problem(marker)
    if problem:
        raise CheckpointError(f"{marker_path}: malformed completion marker: {problem}; "
                              "refusing to resume from this checkpoint")
    return marker


def _marker_problem(marker: Any) -> str | None:
    if not isinstance(marker, dict):
        return "not a JSON object"
    if marker.get("format") != FORMAT_VERSION:
        return f"format {marker.get('format')!r}, expected {FORMAT_VERSION}"
    for key in ("step", "world_size"):
        value = marker.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{key!r} is {value!r}, expected a non-negative int"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "'files' lists no file"
    for name, entry in files.items():
        valid = (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                 and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)
        if not valid:
            return f"entry {name!r} lacks an int size and a 64-hex sha256"
    return None


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate and load `path` into the prepared objects; return (trainer state, data state).

    Accelerate loads everything with `torch.load(weights_only=True)`; nothing here unpickles.
    """
    path = Path(path)
    validate_checkpoint(path, accelerator.num_processes)
    accelerator.load_state(str(path))
    trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    data_file = path / data_state_file(accelerator.process_index)
    data_state = json.loads(data_file.read_text(encoding="utf-8"))
    return trainer_state, data_state
