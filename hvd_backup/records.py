"""What a step leaves behind: its record (the same on every rank but for this rank's part), the outcomes as
small enums, and the per-phase timings behind ``opt.timings()``."""

from __future__ import annotations

import collections
import enum
import threading
from dataclasses import dataclass

__all__ = ["ClosedBy", "Status", "StepRecord", "Timings"]


class Status(str, enum.Enum):
    """What happened to this rank's gradient in a step (compares equal to its string value)."""

    INCLUDED = "included"  # it counted
    DROPPED = "dropped"  # it was ready too late for its step, which was applied without it
    CAUGHT_UP = "caught_up"  # computed on superseded parameters: discarded, parameters brought to the current step
    ABSENT = "absent"  # this rank's training thread handed in nothing while the step ran

    def __str__(self) -> str:
        return self.value


class ClosedBy(str, enum.Enum):
    """Why a step stopped taking arrivals (compares equal to its string value)."""

    ALL = "all"  # every rank arrived
    QUORUM = "quorum"  # the first N - b arrived
    TIMEOUT = "timeout"  # straggler_timeout closed it with fewer
    REMAINING = "remaining"  # every rank still training arrived; the others had left their loops (close())
    ASYNC = "async"  # asynchronous SGD: one rank's update

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class StepRecord:
    """What happened in one global step, identical on every rank except ``status`` and ``wait_s``."""

    step: int
    size: int
    count: int
    included: tuple[int, ...]
    closed_by: ClosedBy
    status: Status
    wait_s: float
    arrival_s: tuple[float | None, ...]  # per rank, seconds after the step's first arrival; None: did not arrive
    compute_s: tuple[float | None, ...]  # per rank, compute time of the gradient it handed in during this step
    duration_s: float  # this rank: from the previous step's completion to this one's
    loss: tuple[float | None, ...] = ()  # per rank, the loss it reported with the gradient it handed in
    stop_requested: bool = False  # some rank asked the group to stop after this step (request_stop)
    seen_s: tuple[float | None, ...] = ()  # per rank that did not arrive: when it learned the step had closed
    staleness: int | None = None  # asynchronous SGD only: updates that landed between this one's read and write
    quorum: int = 0  # k = N - b in force for this step
    rank_step_s: tuple[float, ...] = ()  # per rank, the duration of its previous step (for choosing b)
    skipped: bool = False  # GradScaler: the summed gradient was not finite, so no rank applied an update
    detached: tuple[int, ...] = ()  # ranks that took no part in this step's allreduce (``detach_after``)

    @property
    def mean_loss(self) -> float | None:
        """Mean loss over the included ranks that reported one."""
        values = [self.loss[r] for r in self.included if r < len(self.loss) and self.loss[r] is not None]
        return sum(values) / len(values) if values else None

    @property
    def dropped(self) -> tuple[int, ...]:
        """Ranks whose gradient is not in this step."""
        inside = set(self.included)
        return tuple(r for r in range(self.size) if r not in inside)


class Timings:
    """Seconds spent per phase of the protocol, summed, with counts (``opt.timings()`` shows them)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.total: dict[str, float] = collections.defaultdict(float)
        self.count: dict[str, int] = collections.defaultdict(int)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.total[phase] += seconds
            self.count[phase] += 1

    def snapshot(self, reset: bool = False) -> dict[str, tuple[float, int]]:
        with self._lock:
            out = {k: (self.total[k], self.count[k]) for k in self.total}
            if reset:
                self.total.clear()
                self.count.clear()
        return out
