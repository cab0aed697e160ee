"""What the protocol's steps share on one rank: a hand-in from the training thread, one step's state, the
outcomes of waiting for a turn, and the layout of the small metadata allreduce that travels with each step."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from ..records import StepRecord

__all__ = ["Meta", "StepState", "Submission", "Turn"]


class Turn(enum.Enum):
    """How waiting for a step ended (steps 1-2)."""

    ARRIVED = "arrived"  # this rank's gradient arrived; it is included if it was among the first N - b
    CLOSED = "closed"  # the step closed without this rank's gradient
    STOPPED = "stopped"  # every rank stopped: the communication thread ends
    REBASED = "rebased"  # the global step was restored from a checkpoint before the first step


class Meta:
    """The float64 metadata allreduce: per-rank blocks of N values, then the first arriver's hyper-parameters.
    Ranks write only their own column, so the sum is everyone's values."""

    ARRIVAL, STATUS, COMPUTE, LOSS, STOP, DURATION = range(6)
    BLOCKS = 6
    # Arrival status codes.
    ABSENT, LATE, IN = 0.0, 1.0, 2.0


@dataclass(eq=False)
class Submission:
    """One gradient handed in by the training thread, computed on the parameters of global step ``version``."""

    version: int
    hyper: list[float]
    compute_s: float
    submitted_at: float
    loss: float | None = None
    arrived: bool = False
    reply: StepRecord | None = None


@dataclass
class StepState:
    """One global step ``t`` as this rank's communication thread sees it."""

    t: int
    order: int | None = None  # this rank's arrival order, None if it did not arrive
    arrived_at: float = math.nan
    closed_seen_at: float = math.nan
    submission: Submission | None = None
