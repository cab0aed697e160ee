"""Step 4, first half, of :mod:`hvd_backup.protocol`: from the reduced buffers, the mean of the included
gradients (the sum divided by their count, not by N) and the step's record."""

from __future__ import annotations

import math
import time

from ..errors import ProtocolError
from ..records import ClosedBy, Status, StepRecord
from .state import Meta, StepState

__all__ = ["reweight"]


def reweight(eng, st: StepState, buf) -> tuple[StepRecord, list[float]]:
    """Divide ``buf`` in place by the count of included gradients; return the step's record (this rank's
    status filled in later) and the first arriver's hyper-parameters."""
    n, t = eng.size, st.t
    count = int(round(float(buf[-1])))
    block = eng._meta[: Meta.BLOCKS * n].view(Meta.BLOCKS, n).tolist()
    status = block[Meta.STATUS]
    ins = tuple(r for r in range(n) if status[r] == Meta.IN)
    if count != len(ins) or count < 1:
        raise ProtocolError(f"step {t}: reduced count {count} but ranks {list(ins)} say they were included")
    buf[:-1].div_(count)  # reweight: the mean over the gradients that were in, not over N
    hyper = eng._meta[Meta.BLOCKS * n:].tolist()
    arrived = [status[r] >= Meta.LATE for r in range(n)]
    times = block[Meta.ARRIVAL]
    first = min((times[r] for r in range(n) if arrived[r]), default=0.0)
    now = time.monotonic()
    closed_by = ClosedBy.ALL if count == n else ClosedBy.QUORUM if count == eng.quorum else ClosedBy.TIMEOUT
    record = StepRecord(
        step=t, size=n, count=count, included=ins, closed_by=closed_by, status=Status.ABSENT, wait_s=0.0,
        arrival_s=tuple(times[r] - first if arrived[r] else None for r in range(n)),
        compute_s=tuple(block[Meta.COMPUTE][r] if block[Meta.COMPUTE][r] > 0 else None for r in range(n)),
        duration_s=now - eng._last_done,
        loss=tuple(block[Meta.LOSS][r] if arrived[r] and math.isfinite(block[Meta.LOSS][r]) else None
                   for r in range(n)),
        stop_requested=any(block[Meta.STOP]),
        seen_s=tuple(None if arrived[r] else times[r] - first for r in range(n)),
        quorum=eng.quorum,
        rank_step_s=tuple(block[Meta.DURATION]),
    )
    eng._last_duration = now - eng._last_done
    eng._last_done = now
    return record, hyper
