"""Step 3 of :mod:`hvd_backup.protocol`: post the step's allreduces — this rank's gradients if it is included,
zeros otherwise, one allreduce per bucket, with its column of the metadata — and wait for them. The step's first
arriver closes the step on ``straggler_timeout`` while it waits (step 2's timeout close).

Every rank posts the same allreduces in the same order (bucket 0, 1, ...), as nonblocking collectives on one
communicator must be. The metadata travels folded into the float32 tail of the last bucket (``Meta.fold``) when
the gradients are float32 and summed as sent, else as a float64 allreduce of its own after the last bucket. An
included rank whose gradient is handed in during the backward pass (``overlap``) posts each bucket once the
training thread says it is ready, and the metadata once ``step()`` sealed the hand-in; a rank that is not
included posts all of its zeros at once, so it never holds anyone up. A rank that is in by construction (quorum
N, no timeout close: the arrival is deferred) posts before it counts its arrival.
"""

from __future__ import annotations

import math
import time

import torch

from mpi_tools import ArrivalCounter, Backoff

from .arrive import count_arrival
from .state import Meta, StepState

__all__ = ["contribute"]


def contribute(eng, st: StepState):
    """Post and complete step ``st.t``'s allreduces; return the reduced gradient buffer."""
    side = eng.side
    sub = st.submission
    buf = side.send if st.included else side.zeros
    if not st.included:
        buf.zero_()
    if eng._busy_since is None:
        eng._busy_since = time.monotonic()
    handles, posted = [], 0
    backoff = Backoff(20e-6, eng.poll_cap)
    closer = st.order == 0 and eng.straggler_timeout is not None and eng.warm
    close_at = time.monotonic() + (eng.straggler_timeout or 0.0)
    tic = time.perf_counter()
    last, fold = len(eng.buckets) - 1, eng.fold_at is not None
    while True:
        # Post every bucket that is ready, in order; an included rank's wait for its own backward pass ends
        # when step() seals the hand-in.
        while posted <= last and _can_post(eng, st, posted):
            if fold and posted == last:  # the metadata travels at the end of the last bucket
                if st.deferred:  # it names the first arriver
                    count_arrival(eng, st, eng.step_quorum())
                _fill_meta(eng, st)
                eng.layout.fold(eng._meta, buf[eng.fold_at:])
            lo, hi = eng.buckets[posted]
            if st.included and eng.predivide != 1.0:
                buf[lo:min(hi, side.numel)].div_(eng.predivide)
            handles.append(eng.backend.start(buf[lo:hi], eng.bucket_names[posted], compress=True))
            posted += 1
        if st.deferred and posted:  # in by construction: counted once its first allreduce is on its way
            count_arrival(eng, st, eng.step_quorum())
        if posted > last and (not st.included or sub.sealed):
            break
        closer = _close_on_timeout(eng, st, closer, close_at)
        eng.tend()
        with eng._cond:
            if not sub.sealed and not (posted <= last and _can_post(eng, st, posted)):
                eng._cond.wait(backoff.interval())
    if not fold:
        _fill_meta(eng, st)
        handles.append(eng.backend.start(eng._meta, f"{eng.name}.meta"))
    eng.counter.mark(st.t)  # only now: a rank whose backward pass never ends is named by the others' watchdogs
    eng.timings.add("posted", time.perf_counter() - tic)
    tic = time.perf_counter()
    eng._quiet_until = time.monotonic() + 1.0
    while not all(eng.backend.done(h) for h in handles):
        closer = _close_on_timeout(eng, st, closer, close_at)
        eng.tend()
        backoff.sleep()
    for h in handles:
        eng.backend.finish(h)
    eng.timings.add("allreduce", time.perf_counter() - tic)
    return buf


def _can_post(eng, st: StepState, j: int) -> bool:
    """Whether bucket ``j`` can be posted: a rank that is out sends zeros at once; an included rank a bucket once
    its gradient is in it, and the bucket that carries the metadata once ``step()`` sealed the hand-in."""
    if not st.included:
        return True
    if j < len(eng.buckets) - 1 or eng.fold_at is None:
        return st.submission.bucket_ready(j)
    return st.submission.sealed


def _fill_meta(eng, st: StepState) -> None:
    """This rank's column of the metadata (and, for the first arriver, the step's hyper-parameters and flags).
    A late rank whose hand-in is not sealed yet knows neither its loss nor its compute time."""
    n, me, layout, side, sub = eng.size, eng.rank, eng.layout, eng.side, st.submission
    meta = eng._meta
    meta.zero_()
    if sub is not None:
        meta[Meta.ARRIVAL * n + me] = st.arrived_at
        meta[Meta.STATUS * n + me] = Meta.IN if st.included else Meta.LATE
        meta[Meta.COMPUTE * n + me] = sub.compute_s if sub.sealed else 0.0
        meta[Meta.LOSS * n + me] = math.nan if sub.loss is None or not sub.sealed else sub.loss
        if st.order == 0:
            meta[layout.hyper_at:layout.flags_at] = torch.tensor(sub.hyper, dtype=torch.float64)
            meta[layout.flags_at + Meta.AMP] = float(sub.amp)
            meta[layout.flags_at + Meta.UNSCALE] = sub.unscale
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
    if eng.members is not None:
        eng.members.announce(st, meta)
    if eng._stop_wanted:
        meta[Meta.STOP * n + me] = 1.0


def _close_on_timeout(eng, st: StepState, closer: bool, close_at: float) -> bool:
    """The first arriver closes the step ``straggler_timeout`` after its arrival once ``min_workers`` arrived;
    whether it still has to."""
    if closer and time.monotonic() >= close_at:
        word = ArrivalCounter.decode(eng.counter.peek(st.t))
        if word.complete(eng.quorum, eng.attached_count()):
            return False
        if word.arrivals >= eng.min_workers:
            eng.notify_if_completed(st.t, eng.counter.close(st.t), ArrivalCounter.CLOSE)
            return False
    return closer
