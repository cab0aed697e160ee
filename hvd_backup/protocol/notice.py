"""Close notices: the rank whose operation on a step's counter word completes the step (the k-th arrival, a
timeout close, the stop that leaves every remaining rank arrived) tells every other attached rank at once, with
a small message. A rank waiting for that step to close then learns it from its own message queue, without a
round trip to the counter's host, which across hosts also waits for that host to enter MPI (3-5 ms here). It
still reads the counter's word now and then (``PEEK_EVERY``), so a notice is never needed for correctness."""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from mpi_tools import Pending

__all__ = ["CloseNotices"]

_TAG = 81
PEEK_EVERY = 0.005  # seconds between reads of the counter's word while notices are on


class CloseNotices:
    """Created collectively (a private duplicate of ``comm``); used from the communication thread only."""

    def __init__(self, comm: MPI.Intracomm, *, enabled: bool = True):
        self.enabled = enabled  # off: sends nothing and says nothing is closed, but still drains
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self._closed: set[int] = set()
        self._out = Pending()

    def send(self, t: int, ranks) -> None:
        """Step ``t`` is complete: tell ``ranks`` (this rank is skipped)."""
        if not self.enabled:
            return
        self._out.prune()
        buf = np.array([t], dtype=np.int64)
        self._out.add([self.comm.Isend([buf, MPI.INT64_T], r, _TAG) for r in ranks if r != self.rank], buf)

    def closed(self, t: int) -> bool:
        """Whether a notice says step ``t`` is complete. Takes the notices that came (those of steps before
        ``t`` are stale) and completes the sends: called only where a rank waits for a close, since beside
        Horovod's own thread every call into MPI slows its allreduce."""
        if not self.enabled:
            return False
        self._poll(t)
        return t in self._closed

    def drain(self, current: int) -> None:
        """Once per step on every rank: take the notices that came, so that a rank that never waits for a close
        does not collect them."""
        self._poll(current)

    def _poll(self, current: int) -> None:
        status = MPI.Status()
        while self.comm.Iprobe(MPI.ANY_SOURCE, _TAG, status):
            buf = np.zeros(1, dtype=np.int64)
            self.comm.Recv([buf, MPI.INT64_T], status.Get_source(), _TAG)
            if int(buf[0]) >= current:
                self._closed.add(int(buf[0]))
        if self._closed and min(self._closed) < current:
            self._closed = {s for s in self._closed if s >= current}
        self._out.prune()

    def free(self) -> None:
        """Collective. The last notices are small (sent eagerly): give them a moment, then let them go."""
        for _ in range(100):
            if not self._out.prune():
                break
            time.sleep(0.01)
        self.comm.Free()
