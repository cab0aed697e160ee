"""Step 4, first half, of :mod:`hvd_backup.protocol`: from the reduced buffers, the mean of the included
gradients (the sum divided by their count, not by N) and the step's record."""

from __future__ import annotations

import math
import time

import torch

from ..errors import ProtocolError
from ..records import ClosedBy, Status, StepRecord
from .state import Meta, StepState

__all__ = ["reweight"]


def reweight(eng, st: StepState, buf) -> tuple[StepRecord, list[float], torch.Tensor]:
    """Turn ``buf`` in place into the update's gradient (the mean over the included ranks, or their sum with
    ``op="sum"``); return the step's record (this rank's status filled in later), the first arriver's
    hyper-parameters, and per parameter whether any included rank had a gradient for it."""
    n, t, layout = eng.size, st.t, eng.layout
    meta = eng._meta
    block = meta[: Meta.BLOCKS * n].view(Meta.BLOCKS, n).tolist()
    status = block[Meta.STATUS]
    ins = tuple(r for r in range(n) if status[r] == Meta.IN)
    count = len(ins)
    if count < 1 and not st.empty:
        raise ProtocolError(f"step {t}: no rank's gradient was included")
    if eng.op == "average" and count:  # reweight: the mean over the gradients that were in, not over N
        if eng.predivide != 1.0:
            buf.mul_(eng.predivide / count)
        else:
            buf.div_(count)
    unscale = meta[layout.flags_at + Meta.UNSCALE].item()
    if unscale != 1.0:  # the gradients travelled scaled by the GradScaler (handed in during backward)
        buf.mul_(unscale)
    hyper = meta[layout.hyper_at:layout.flags_at].tolist()
    amp = meta[layout.flags_at + Meta.AMP].item() > 0
    present = meta[layout.present_at:] > 0
    skipped = amp and not bool(torch.isfinite(buf).all())  # GradScaler: an overflow anywhere skips the update
    arrived = [status[r] >= Meta.LATE for r in range(n)]
    times = block[Meta.ARRIVAL]
    first = min((times[r] for r in range(n) if arrived[r]), default=0.0)
    left = sum(1 for r in range(n) if block[Meta.LEFT][r] > 0)
    now = time.monotonic()
    attached = eng.attached_count()
    closed_by = (ClosedBy.ALL if count == attached else ClosedBy.QUORUM if count == eng.quorum
                 else ClosedBy.REMAINING if count + left >= attached else ClosedBy.TIMEOUT)
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
        skipped=skipped,
        detached=tuple(eng.members.detached()) if eng.members is not None else (),
    )
    eng._last_duration = now - eng._last_done
    eng._last_done = now
    return record, hyper, present
