"""Training progress: a tqdm bar on a terminal, periodic log lines anywhere else.

Without a terminal (SLURM, CI, nohup, a pipe) every bar refresh becomes a line of the log: a
1458-step run wrote about 2,900 of them. There a line every `1/PERIODIC_LINES` of the run is
enough to follow it, as transformers' Trainer logs instead of redrawing when it is not
interactive.
"""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["PERIODIC_LINES", "TrainingProgress"]

# Lines a non-terminal log gets over a whole run (plus the last step).
PERIODIC_LINES = 20


class TrainingProgress:
    """`update(step, loss, lr)` after each optimizer step; `close()` at the end."""

    def __init__(self, total_steps: int, initial_step: int, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total_steps = total_steps
        self.every = max(1, total_steps // PERIODIC_LINES)
        self.bar = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="training",
                            file=self.stream)  # fmt: skip

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif step % self.every == 0 or step == self.total_steps:
            print(f"training: step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e}",
                  file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
