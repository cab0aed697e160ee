"""What the training job says to the console: exit codes, and lines printed by rank 0 only."""

from __future__ import annotations

__all__ = ["EXIT_OK", "EXIT_PREEMPTED", "EXIT_USAGE", "print0"]

EXIT_OK, EXIT_USAGE, EXIT_PREEMPTED = 0, 2, 3


def print0(rank: int, *args, **kw) -> None:
    """``print`` on rank 0, flushed; nothing elsewhere."""
    if rank == 0:
        print(*args, **kw, flush=True)
