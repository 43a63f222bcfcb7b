"""One run owns an output folder: an advisory lock that the operating system releases when the
owning process dies, and checks that what `--overwrite` removes was written by a run.

`fcntl.flock` locks belong to the open file, not to the file's existence: a run killed by SIGKILL,
OOM or a power cut releases its lock with its last file descriptor, so a crashed run can never
leave an output folder stuck, and no stale-lock guessing (pids, timestamps) is needed.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

__all__ = ["LOCK_FILE", "OutputDirBusy", "OutputDirLock", "not_written_by_a_run"]

LOCK_FILE = ".topoflow-run.lock"


class OutputDirBusy(RuntimeError):
    """Another live process holds the output folder's lock."""


class OutputDirLock:
    """Exclusive lock on `<output_dir>/.topoflow-run.lock`, held until `release` or exit."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise OutputDirBusy naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise OutputDirBusy(
                f"--output-dir {self.path.parent} is in use by another run ({holder}); wait for "
                "it to finish or stop it, or choose another --output-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


# What each folder a run writes may hold; anything else in it belongs to the user.
_RUN_FOLDER_CONTENT = {
    "model": lambda rel: rel.count("/") == 0,
    "checkpoints": lambda rel: rel.split("/")[0].startswith(("checkpoint-", ".tmp-")),
    "logs": lambda rel: rel.startswith("topoflow/") and ".tfevents." in rel,
    "debug": lambda rel: rel.startswith("sample_ids_rank") and rel.endswith(".jsonl"),
}


def not_written_by_a_run(path: Path) -> list[str]:
    """Files under the run folder `path` (model/, checkpoints/, logs/, debug/) that a run does not
    write there; a model/ folder must also carry the SHA256SUMS every run writes."""
    accepts = _RUN_FOLDER_CONTENT.get(path.name)
    if accepts is None or not path.is_dir():
        return []
    foreign = [
        f"{path.name}/{rel}"
        for rel in (p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file())
        if not accepts(rel)
    ]
    if path.name == "model" and not (path / "SHA256SUMS").is_file():
        foreign.append("model/ (no SHA256SUMS: not a model folder a run wrote)")
    return foreign
