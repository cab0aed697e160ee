"""Steps 1 and 2 of :mod:`hvd_backup.protocol`: arrive at a step with this rank's gradient, or learn that the
step closed without it; a rank that has left its loop (``close()``) says so at every step instead."""

from __future__ import annotations

import time

from mpi_tools import ArrivalCounter, Backoff

from ..errors import ProtocolError
from .notice import PEEK_EVERY
from .state import StepState, Turn

__all__ = ["await_turn", "count_arrival"]

IDLE_POLL = 0.01  # seconds between chores (heartbeat, failure word, watchdog) while nothing can happen


def await_turn(eng, st: StepState) -> Turn:
    """Run on the communication thread until this rank's part in step ``st.t`` is decided: arrive with the
    gradient the training thread handed in (one fetch-and-add on the step's counter word) or see the step
    complete without it; catch up a gradient that is already stale on the way."""
    k, t, n = eng.step_quorum(), st.t, eng.attached_count()
    backoff = Backoff(20e-6, eng.poll_cap)
    left_here = False
    next_peek = 0.0
    # With k = N (b = 0, or the start-up step) and no timeout close the step cannot close before this rank
    # arrives or leaves: there is nothing to poll for, and every poll costs the training thread CPU and the
    # counter's host a message. The host itself keeps polling: its MPI progress serves the others' arrivals.
    every_in = k >= n and not (eng.straggler_timeout is not None and eng.warm)  # no quorum short of N, no close
    idle = every_in and eng.rank != eng.counter.root
    while True:
        with eng._cond:
            if eng._rebase_to is not None:
                if eng._last_record is not None:
                    raise ProtocolError(f"rank {eng.rank}: the global step was restored after step "
                                        f"{eng._last_record.step} ran: other ranks started training first")
                eng.step = eng.version = eng._rebase_to
                eng._rebase_to = None
                eng._cond.notify_all()
                return Turn.REBASED
        late = eng._late_hand_in(t)
        if late is not None:  # arrived too late for an earlier step, sealed since: catch it up now
            eng.catch_up(late)
            continue
        sub = eng._take()
        if sub is not None and sub.version < t:
            if sub.sealed:
                eng.catch_up(sub)
                continue
            sub = None  # computed on superseded parameters and still in its backward pass: caught up once sealed
        if sub is not None:
            sub.arrived = True
            st.submission = sub
            eng._busy_since = time.monotonic()
            if every_in:
                # The allreduces go first, and the fetch-and-add, which across hosts waits for the counter's host
                # to enter MPI, follows them.
                st.included, st.deferred = True, True
                return Turn.ARRIVED
            count_arrival(eng, st, k)
            return Turn.ARRIVED
        if eng._stopping and not left_here:
            eng._busy_since = time.monotonic()
            eng.notify_if_completed(t, eng.counter.stop(t), ArrivalCounter.STOP)
            left_here = True
        if (not idle or left_here) and eng.notices.closed(t):
            st.closed_seen_at = eng.clock.now()
            eng.timings.add("close_notice", 0.0)  # counted: how often a close was learnt from a notice
            return Turn.CLOSED
        now = time.monotonic()
        if (not idle or left_here) and now >= next_peek:
            # With close notices the word is read now and then only: the notice is what a waiting rank learns
            # the close from (.notice).
            next_peek = now + (PEEK_EVERY if eng.notices.enabled else 0.0)
            word = ArrivalCounter.decode(eng.counter.peek(t))
            if word.complete(k, n):
                st.closed_seen_at = eng.clock.now()
                return Turn.CLOSED
            if word.everyone_left(n):
                if eng.members is not None and eng.members.detached():
                    # No one trains, but detached ranks must still be attached to end with the same state: an
                    # empty step, in whose metadata the counter's host has them join.
                    st.empty, st.closed_seen_at = True, eng.clock.now()
                    return Turn.CLOSED
                return Turn.STOPPED
        eng.tend()
        with eng._cond:
            pending = eng._pending
            if eng._rebase_to is None and (
                    pending is None or pending.reply is not None
                    or (pending.arrived or pending.version < t) and not pending.sealed):
                eng._cond.wait(IDLE_POLL if idle and not left_here else backoff.interval())


def count_arrival(eng, st: StepState, k: int) -> None:
    """Count this rank's arrival at step ``st.t`` on the counter (one fetch-and-add): its order, and whether it
    is in (one of the first ``k``, before any close). A deferred arrival must find itself in."""
    tic = time.perf_counter()
    value = eng.counter.arrive(st.t)
    st.arrived_at = eng.clock.now()
    eng.notify_if_completed(st.t, value, 1)
    seen = ArrivalCounter.decode(value)
    eng.timings.add("arrive", time.perf_counter() - tic)
    if st.deferred and not seen.admits(k):
        raise ProtocolError(f"rank {eng.rank}: step {st.t} with a quorum of all {k} ranks and no close counted "
                            f"this rank's arrival as excluded ({seen})")
    st.order, st.included, st.deferred = seen.arrivals, seen.admits(k), False
