"""What the protocol's steps share on one rank: a hand-in from the training thread, one step's state, the
outcomes of waiting for a turn, and the layout of the small metadata that travels with each step's allreduce."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..records import StepRecord

__all__ = ["Meta", "StepState", "Submission", "Turn"]

_LOW22, _LOW20 = (1 << 22) - 1, (1 << 20) - 1


class Turn(enum.Enum):
    """How waiting for a step ended (steps 1-2)."""

    ARRIVED = "arrived"  # this rank's gradient arrived; it is included if it was among the first N - b
    CLOSED = "closed"  # the step closed without this rank's gradient
    STOPPED = "stopped"  # every rank stopped: the communication thread ends
    REBASED = "rebased"  # the global step was restored from a checkpoint before the first step


class Meta:
    """The step's float64 metadata, summed over the ranks: per-rank blocks of N values (each rank writes only its
    own column, so the sum is everyone's values); then the first arriver's hyper-parameters and flags; then, per
    parameter, how many included ranks had a gradient for it. It travels as an allreduce of its own, or folded
    into a float32 gradient buffer (:meth:`fold`), exact either way for any number of ranks."""

    ARRIVAL, STATUS, COMPUTE, LOSS, STOP, DURATION, LEFT, JOIN, DETACH = range(9)
    # Written by the counter's host only (``detach_after``), per rank: JOIN, the step at which a detached rank is
    # attached again; DETACH, the step from which an attached one is detached.
    BLOCKS = 9
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
        # Folded into a float32 gradient buffer: every value before ``present`` as three float32 integers of
        # 22, 22 and 20 bits (exact, and exact when summed with zeros: each has one writer), the per-parameter
        # counts as float32 (exact below 2**24 ranks).
        self.folded_length = 3 * self.present_at + params

    def fold(self, meta: torch.Tensor, out: torch.Tensor) -> None:
        """Write the float64 ``meta`` into the float32 ``out`` (``folded_length`` elements, any device)."""
        at = self.present_at
        bits = meta[:at].numpy().view(np.uint64)
        folded = np.empty(self.folded_length, dtype=np.float32)
        chunks = folded[:3 * at].reshape(at, 3)
        chunks[:, 0] = bits >> np.uint64(42)
        chunks[:, 1] = (bits >> np.uint64(20)) & np.uint64(_LOW22)
        chunks[:, 2] = bits & np.uint64(_LOW20)
        folded[3 * at:] = meta[at:].numpy()
        out.copy_(torch.from_numpy(folded))

    def unfold(self, folded: torch.Tensor, meta: torch.Tensor) -> None:
        """Read the sum of folded metadata back into the float64 ``meta``."""
        at = self.present_at
        values = folded.detach().cpu().numpy()
        chunks = values[:3 * at].reshape(at, 3).astype(np.uint64)
        bits = (chunks[:, 0] << np.uint64(42)) | (chunks[:, 1] << np.uint64(20)) | chunks[:, 2]
        meta[:at] = torch.from_numpy(bits.view(np.float64).copy())
        meta[at:] = torch.from_numpy(values[3 * at:].astype(np.float64))


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
    deferred: bool = False  # in by construction (quorum N, no close); the arrival is counted after posting
    empty: bool = False  # every attached rank has left while some are detached: no update, only their join
    arrived_at: float = math.nan
    closed_seen_at: float = math.nan
    submission: Submission | None = None
