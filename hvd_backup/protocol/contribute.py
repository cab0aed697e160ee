"""Step 3 of :mod:`hvd_backup.protocol`: post the step's two allreduces — this rank's gradients if it is
included, zeros otherwise; and its column of the metadata — and wait for them. The step's first arriver closes
the step on ``straggler_timeout`` while it waits (step 2's timeout close)."""

from __future__ import annotations

import math
import time

import torch

from mpi_tools import ArrivalCounter, Backoff

from .state import Meta, StepState

__all__ = ["contribute"]


def contribute(eng, st: StepState):
    """Post and complete step ``st.t``'s allreduces; return the reduced gradient buffer."""
    side, n, me, layout = eng.side, eng.size, eng.rank, eng.layout
    sub = st.submission
    if st.included:
        buf = side.send
        if eng.predivide != 1.0:
            buf.div_(eng.predivide)
    else:
        buf = side.zeros
        buf.zero_()
    meta = eng._meta
    meta.zero_()
    if sub is not None:
        meta[Meta.ARRIVAL * n + me] = st.arrived_at
        meta[Meta.STATUS * n + me] = Meta.IN if st.included else Meta.LATE
        meta[Meta.COMPUTE * n + me] = sub.compute_s
        meta[Meta.LOSS * n + me] = math.nan if sub.loss is None else sub.loss
        if st.order == 0:
            meta[layout.hyper_at:layout.flags_at] = torch.tensor(sub.hyper, dtype=torch.float64)
            meta[layout.flags_at + Meta.AMP] = float(sub.amp)
        if st.included:
            meta[layout.present_at:] = side.present
    else:
        meta[Meta.ARRIVAL * n + me] = st.closed_seen_at  # when this rank learned the step had closed
        if eng._stale_compute is not None:  # the compute time of a gradient that came too late to count
            meta[Meta.COMPUTE * n + me] = eng._stale_compute
        if eng._stopping:
            meta[Meta.LEFT * n + me] = 1.0
    eng._stale_compute = None
    meta[Meta.DURATION * n + me] = eng._last_duration
    if eng._stop_wanted:
        meta[Meta.STOP * n + me] = 1.0
    if eng._busy_since is None:
        eng._busy_since = time.monotonic()
    eng.counter.mark(st.t)
    handles = [eng.backend.start(buf, f"{eng.name}.grad", compress=True),
               eng.backend.start(meta, f"{eng.name}.meta")]
    tic = time.perf_counter()
    _wait(eng, st, handles)
    eng.timings.add("allreduce", time.perf_counter() - tic)
    return buf


def _wait(eng, st: StepState, handles) -> None:
    """Wait for the step's allreduces; the first arriver closes the step on ``straggler_timeout``."""
    backoff = Backoff(20e-6, eng.poll_cap)
    closer = st.order == 0 and eng.straggler_timeout is not None and eng.warm
    close_at = time.monotonic() + (eng.straggler_timeout or 0.0)
    while not all(eng.backend.done(h) for h in handles):
        if closer and time.monotonic() >= close_at:
            word = ArrivalCounter.decode(eng.counter.peek(st.t))
            if word.complete(eng.quorum, eng.size):
                closer = False
            elif word.arrivals >= eng.min_workers:
                eng.counter.close(st.t)
                closer = False
        eng.tend()
        backoff.sleep()
    for h in handles:
        eng.backend.finish(h)
