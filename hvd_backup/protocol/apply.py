"""Step 4, second half, and step 5 of :mod:`hvd_backup.protocol`: apply the identical update — to the live
parameters if this rank's training thread waits for this step, else to the consensus copy — and catch a rank
up whose gradient was computed on superseded parameters."""

from __future__ import annotations

import time

from ..errors import ProtocolError
from ..records import Status, StepRecord
from .state import StepState, Submission

__all__ = ["apply", "catch_up"]


def apply(eng, st: StepState, buf, hyper, present, record: StepRecord) -> None:
    """Apply step ``st.t``'s update (none when the step was ``skipped``); answer a training thread waiting for
    this step (or catch it up)."""
    side, t = eng.side, st.t
    with eng._cond:
        # A hand-in still in its backward pass (overlap, not sealed) is never answered here: its parameters are
        # in use. It is caught up from the consensus copy once step() seals it (await_turn).
        pending = eng._pending
        if pending is None or pending.reply is not None or not pending.sealed:
            pending = None
    if pending is not None and pending.version == t:
        side.apply_live(buf, hyper, present, skip=record.skipped or st.empty)
        eng.version = t + 1
        _snapshot(eng, t + 1, side.live_params())
    else:
        if eng.consensus_version != t:
            if eng.version != t:
                raise ProtocolError(f"step {t}: neither live ({eng.version}) nor consensus "
                                    f"({eng.consensus_version}) parameters are at this step")
            side.sync_consensus()
        side.apply_consensus(buf, hyper, present, skip=record.skipped or st.empty)
        eng.consensus_version = t + 1
        _snapshot(eng, t + 1, side.consensus_params())
        behind = t + 1 - eng.version
        if eng.max_lag is not None and behind > eng.max_lag and not eng._stopping:
            raise ProtocolError(f"rank {eng.rank}: its training thread is {behind} steps behind at step {t}, "
                                f"more than max_lag={eng.max_lag}")
    if record.stop_requested:
        eng.stop_requested = True
    eng._last_record = record
    eng.records.append(record)
    eng._covered.append(record.skipped)
    if eng.auto is not None:
        b = eng.auto.observe(record)
        if b is not None:
            eng.quorum = eng.size - b
    if pending is not None and pending.version == t:
        eng.reply(pending, record, Status.INCLUDED if st.included else Status.DROPPED)
    elif pending is not None:  # a stale gradient handed in while the step ran
        catch_up(eng, pending)


def catch_up(eng, sub: Submission) -> None:
    """Step 5: drop a gradient computed on old parameters; copy the consensus into the live state."""
    if eng.consensus_version <= sub.version:
        raise ProtocolError(f"rank {eng.rank}: catch-up from step {sub.version} but the consensus is at "
                            f"{eng.consensus_version}")
    tic = time.perf_counter()
    eng.side.restore_live()
    eng.timings.add("catch_up", time.perf_counter() - tic)
    eng._stale_compute = sub.compute_s
    eng.version = eng.consensus_version
    last = eng._last_record  # the step the consensus now holds (not eng.records: the user pops those)
    if last is None:
        raise ProtocolError(f"catch-up at step {eng.step} before any step completed")
    eng.reply(sub, last, Status.CAUGHT_UP)


def _snapshot(eng, version: int, params) -> None:
    every = eng.snapshot_every
    if every and version % every == 0:
        copy = [p.detach().clone() for p in params]
        with eng._cond:
            eng._snapshots[version] = copy
