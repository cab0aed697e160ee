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
    """The float64 metadata allreduce: per-rank blocks of N values (each rank writes only its own column, so the
    sum is everyone's values); then the first arriver's hyper-parameters and flags; then, per parameter, how
    many included ranks had a gradient for it. Float64 counts are exact for any number of ranks."""

    ARRIVAL, STATUS, COMPUTE, LOSS, STOP, DURATION, LEFT = range(7)
    BLOCKS = 7
    # Arrival status codes.
    ABSENT, LATE, IN = 0.0, 1.0, 2.0
    # Flags after the hyper-parameters: a GradScaler was in use; the factor that unscales the reduced sum (1 unless
    # the gradients travelled scaled, as they do when they leave during the backward pass).
    AMP, UNSCALE = 0, 1
    FLAGS = 2

    def __init__(self, size: int, hyper_len: int, params: int):
        self.size, self.hyper_len, self.params = size, hyper_len, params
        self.hyper_at = self.BLOCKS * size
        self.flags_at = self.hyper_at + hyper_len
        self.present_at = self.flags_at + self.FLAGS
        self.length = self.present_at + params


@dataclass(eq=False)
class Submission:
    """One gradient handed in by the training thread, computed on the parameters of global step ``version``.

    With ``overlap`` it is handed in bucket by bucket during the backward pass: it exists (and arrives) from its
    first ready bucket on, ``ready[j]`` says which buckets are in ``send``, and ``step()`` seals it with the rest
    (hyper-parameters, loss, the buckets no hook completed). Without overlap it is sealed when made."""

    version: int
    hyper: list[float]
    compute_s: float
    submitted_at: float
    loss: float | None = None
    amp: bool = False  # a GradScaler was in use: a non-finite sum skips the update
    unscale: float = 1.0  # the factor that unscales the reduced sum (the gradients travelled scaled)
    arrived: bool = False
    sealed: bool = True
    ready: list[bool] | None = None  # per bucket, while not sealed
    reply: StepRecord | None = None
    covered: list[bool] | None = None  # per global step applied since the previous reply: was it skipped?

    def bucket_ready(self, j: int) -> bool:
        return self.sealed or bool(self.ready and self.ready[j])


@dataclass
class StepState:
    """One global step ``t`` as this rank's communication thread sees it."""

    t: int
    order: int | None = None  # this rank's arrival order, None if it did not arrive
    included: bool = False  # its arrival was among the first N - b, before any close
    arrived_at: float = math.nan
    closed_seen_at: float = math.nan
    submission: Submission | None = None
