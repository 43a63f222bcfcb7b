"""Skip optimizer steps whose loss or gradient is NaN/Inf, and abort when that persists."""

from __future__ import annotations

import logging

__all__ = ["NonFiniteGuard", "TrainingAborted"]

logger = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Training stopped because the loss or gradients stayed non-finite."""


class NonFiniteGuard:
    """Count optimizer steps skipped for a NaN/Inf loss or gradient; abort after `limit` in a row.

    Every rank must feed it the same verdicts (the loss is all-reduced before it is judged), so
    all ranks skip or abort together and no collective is left waiting.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"NonFiniteGuard limit must be >= 1, got {limit}")
        self.limit = limit
        self.in_a_row = 0
        self.total_skipped = 0

    def observe(self, finite: bool, step: int, what: str = "loss") -> bool:
        """Record one step; return True when the step must be skipped."""
        if finite:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total_skipped += 1
        logger.warning("step %d: non-finite %s, optimizer step skipped (%d in a row, %d in total)",
                       step, what, self.in_a_row, self.total_skipped)
        if self.in_a_row >= self.limit:
            raise TrainingAborted(
                f"step {step}: {self.in_a_row} consecutive steps with a non-finite {what} "
                f"(--max-nonfinite-steps {self.limit}); aborting without saving the weights"
            )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row = int(state["in_a_row"])
        self.total_skipped = int(state["total_skipped"])

