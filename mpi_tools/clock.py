"""A shared clock: each rank's offset to the root rank's ``time.monotonic()``.

Arrival times are compared across ranks, and monotonic clocks of different nodes have different origins.
``ClockSync`` measures the offset with a few ping-pongs to the root (the round trip with the smallest delay
wins; its error is at most half that round trip, microseconds on a cluster network).
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

__all__ = ["ClockSync"]


class ClockSync:
    """Offset of this rank's monotonic clock to ``root``'s. The constructor is collective over ``comm``."""

    def __init__(self, *, comm: MPI.Intracomm, root: int = 0, rounds: int = 4, tag: int = 7):
        comm = comm.Dup()  # private: the ping-pongs never meet the caller's messages
        rank, size = comm.Get_rank(), comm.Get_size()
        self.offset = 0.0
        self.error = 0.0
        buf = np.zeros(1)
        if rank == root:
            for peer in range(size):
                if peer == root:
                    continue
                for _ in range(rounds):
                    comm.Recv([buf, MPI.DOUBLE], peer, tag)
                    buf[0] = time.monotonic()
                    comm.Send([buf, MPI.DOUBLE], peer, tag)
        else:
            best = float("inf")
            for _ in range(rounds):
                t0 = time.monotonic()
                comm.Send([buf, MPI.DOUBLE], root, tag)
                comm.Recv([buf, MPI.DOUBLE], root, tag)
                t1 = time.monotonic()
                if t1 - t0 < best:
                    best = t1 - t0
                    self.offset = float(buf[0]) - (t0 + t1) / 2
                    self.error = best / 2
        comm.Free()

    def now(self) -> float:
        """The root's monotonic clock, as seen from this rank."""
        return time.monotonic() + self.offset
