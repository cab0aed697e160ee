"""Step 3 of :mod:`hvd_backup.protocol`: post the step's two allreduces — this rank's gradients and a count of
1 if it is included, zeros otherwise; and its column of the metadata — and wait for them. The step's first
arriver closes the step on ``straggler_timeout`` while it waits (step 2's timeout close)."""

from __future__ import annotations

import math
import time

import torch

from mpi_tools import ArrivalCounter, Backoff

from .state import Meta, StepState

__all__ = ["contribute"]


def contribute(eng, st: StepState):
    """Post and complete step ``st.t``'s allreduces; return the reduced gradient buffer and whether this rank's
    gradient is in it."""
    side, n, me = eng.side, eng.size, eng.rank
    included = st.order is not None and st.order < eng.quorum
    if included:
        buf = side.send
        buf[-1] = 1.0
    else:
        buf = side.zeros
        buf.zero_()
    meta = eng._meta
    meta.zero_()
    sub = st.submission
    if sub is not None:
        meta[Meta.ARRIVAL * n + me] = st.arrived_at
        meta[Meta.STATUS * n + me] = Meta.IN if included else Meta.LATE
        meta[Meta.COMPUTE * n + me] = sub.compute_s
        meta[Meta.LOSS * n + me] = math.nan if sub.loss is None else sub.loss
        if st.order == 0:
            meta[Meta.BLOCKS * n:] = torch.tensor(sub.hyper, dtype=torch.float64)
    else:
        meta[Meta.ARRIVAL * n + me] = st.closed_seen_at  # when this rank learned the step had closed
        if eng._stale_compute is not None:  # the compute time of a gradient that came too late to count
            meta[Meta.COMPUTE * n + me] = eng._stale_compute
    eng._stale_compute = None
    meta[Meta.DURATION * n + me] = eng._last_duration
    if eng._stop_wanted:
        meta[Meta.STOP * n + me] = 1.0
    if eng._busy_since is None:
        eng._busy_since = time.monotonic()
    eng.counter.mark(st.t)
    handles = [eng.backend.start(buf, "hvd_backup.grad"), eng.backend.start(meta, "hvd_backup.meta")]
    tic = time.perf_counter()
    _wait(eng, st, handles)
    eng.timings.add("allreduce", time.perf_counter() - tic)
    return buf, included


def _wait(eng, st: StepState, handles) -> None:
    """Wait for the step's allreduces; the first arriver closes the step on ``straggler_timeout``."""
    backoff = Backoff(20e-6, eng.poll_cap)
    closer = st.order == 0 and eng.straggler_timeout is not None
    close_at = time.monotonic() + (eng.straggler_timeout or 0.0)
    while not all(eng.backend.done(h) for h in handles):
        if closer and time.monotonic() >= close_at:
            word = ArrivalCounter.decode(eng.counter.peek(st.t))
            if word.arrivals >= eng.quorum or word.closes:
                closer = False
            elif word.arrivals >= eng.min_workers:
                eng.counter.close(st.t)
                closer = False
        eng.tend()
        backoff.sleep()
    for h in handles:
        eng.backend.finish(h)
