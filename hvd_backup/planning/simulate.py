"""A zero-overhead event simulation of the backup-worker protocol.

Ranks compute gradients; a step closes at the k-th arrival of a gradient computed on that step's parameters
(k = N - b), instantly; the included ranks start the next step at once; a rank that finishes on superseded
parameters restarts on the newest ones as soon as they exist (the catch-up). Communication and updates take no
time unless a ``comm_s`` per step is given, which is added to every step's close. This is the "ideal" the
overhead benchmark compares measured runs with, the engine of the b-planner, and the clock of the virtual
cluster (:mod:`hvd_backup.planning.virtual`), which steps it one close at a time.

:class:`BucketSchedule` is the same clock with the gradient in buckets (``overlap=True``): each bucket is ready
at its own time during the backward pass, each bucket's allreduce takes its own time on the link, and the
inclusion rule (:class:`Inclusion`) says who is in for which bucket: once per step at the hand-in (``step()``),
once per step at the first bucket (what the optimizer does with overlap), or bucket by bucket.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Sequence

__all__ = ["BucketSchedule", "Inclusion", "Schedule", "simulate"]


class Schedule:
    """The protocol's clock, one step at a time.

    ``work(rank, version)`` is the seconds rank ``rank`` needs for a gradient on the parameters of global step
    ``version`` (compute plus any delay); it is called once for every gradient a rank starts, when it starts it,
    in order for each rank. ``time`` is when the parameters of ``version`` became available.
    """

    def __init__(self, n: int, work: Callable[[int, int], float], comm_s: float = 0.0):
        self.n, self.work, self.comm_s = n, work, comm_s
        self.version = 0
        self.time = 0.0
        self._late: dict[int, float] = {}
        self._heap: list[tuple[float, int, int, float]] = []  # (ready time, rank, version it computes on, start)
        for rank in range(n):
            self._start(rank, 0.0)

    def _start(self, rank: int, at: float) -> None:
        heapq.heappush(self._heap, (at + self.work(rank, self.version), rank, self.version, at))

    def close(self, k: int) -> tuple[list[int], dict[int, float]]:
        """Run until the current step closes with ``k`` arrivals. Returns the included ranks in arrival order,
        and the seconds of work of every gradient handed in since the previous close: the included ones, and
        those that came after their step had closed (dropped; their ranks restarted on the newest parameters)."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k={k} must satisfy 1 <= k <= n={self.n}")
        arrived, seconds = [], {}
        while len(arrived) < k:
            ready, rank, on, began = heapq.heappop(self._heap)
            if on < self.version:
                # Finished on superseded parameters: dropped. The newest parameters exist from the latest close
                # (the step's allreduce and update) on; a rank that finished before that waits for them.
                seconds[rank] = ready - began
                self._start(rank, max(ready, self.time))
                continue
            arrived.append(rank)
            seconds[rank] = ready - began
        self.version += 1
        self.time = ready + self.comm_s
        for rank in arrived:
            self._start(rank, self.time)
        return arrived, seconds


def simulate(n: int, b: int, steps: int, work: Callable[[int, int], float], comm_s: float = 0.0) -> dict:
    """Simulate ``steps`` global steps on ``n`` ranks with ``b`` backup workers.

    ``work(rank, version)`` is the seconds rank ``rank`` needs for a gradient on the parameters of global step
    ``version`` (compute plus any delay). Returns ``{"time": seconds for all steps, "step_times": [...],
    "included": [[ranks], ...]}``.
    """
    if not 0 <= b < n:
        raise ValueError(f"b={b} must satisfy 0 <= b < n={n}")
    clock = Schedule(n, work, comm_s)
    step_times, included, last = [], [], 0.0
    for _ in range(steps):
        ranks, _ = clock.close(n - b)
        step_times.append(clock.time - last)
        included.append(sorted(ranks))
        last = clock.time
    return {"time": clock.time, "step_times": step_times, "included": included}


class Inclusion(str, enum.Enum):
    """Who is in for which bucket of a step, and when each bucket's allreduce can start."""

    STEP = "step"  # the hand-in at step(): the first k whole gradients are in; one allreduce after the k-th
    FIRST = "first"  # overlap, decided at the first bucket: its first k are in for every bucket (what is built)
    BUCKET = "bucket"  # overlap, per bucket: the first k ranks with bucket j ready are in for bucket j


class BucketSchedule:
    """The protocol's clock with the gradient in J buckets, one step at a time.

    ``ready(rank, version)`` gives, for a gradient rank ``rank`` starts on the parameters of step ``version``, the
    seconds from its start to each bucket's readiness in backward order (non-decreasing; the last is the whole
    gradient, ``step()``); it is called once per gradient, when it starts, in order for each rank. Bucket j's
    allreduce takes ``comm_s[j]`` and starts when the ranks in for it have it ready (:class:`Inclusion`) and the
    previous bucket's allreduce is done (one link, buckets in order); ``close_s`` follows the last (the update,
    the counter). A rank that is out posts zeros at once and holds nobody up. As in :class:`Schedule`, a rank whose
    gradient comes after its step closed loses it (for the buckets not yet closed, with ``BUCKET``) and starts
    again on the newest parameters once they exist; step 0 is whatever ``k`` the caller passes."""

    def __init__(self, n: int, ready: Callable[[int, int], Sequence[float]], comm_s: Sequence[float],
                 inclusion: Inclusion, close_s: float = 0.0):
        if not comm_s:
            raise ValueError("comm_s: one allreduce time per bucket, at least one bucket")
        self.n, self.ready, self.comm_s = n, ready, list(comm_s)
        self.inclusion, self.close_s = Inclusion(inclusion), close_s
        self.version = 0
        self.time = 0.0
        self._on = [0] * n  # the version each rank's current gradient is computed on
        self._start = [0.0] * n
        self._offsets: list[list[float]] = [[] for _ in range(n)]
        self._dropped: dict[int, float] = {}  # seconds of gradients dropped at the last close, told at this one
        for rank in range(n):
            self._begin(rank, 0.0)

    def _begin(self, rank: int, at: float) -> None:
        offsets = [float(x) for x in self.ready(rank, self.version)]
        if len(offsets) != len(self.comm_s) or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"ready({rank}, {self.version}) = {offsets}: one non-decreasing time per bucket "
                             f"({len(self.comm_s)})")
        self._on[rank], self._start[rank], self._offsets[rank] = self.version, at, offsets

    def _at(self, rank: int, j: int) -> float:
        return self._start[rank] + self._offsets[rank][j]

    def _decide(self, k: int) -> tuple[list[list[int]], float, float]:
        """Who is in for each bucket among the ranks computing on this step's parameters, when the last of those
        choices is made (the step is closed: a rank arriving later is out), and when the step's update exists;
        both infinity while fewer than ``k`` compute on them."""
        ranks = [r for r in range(self.n) if self._on[r] == self.version]
        buckets = range(len(self.comm_s))
        if len(ranks) < k:
            return [], math.inf, math.inf
        if self.inclusion is Inclusion.BUCKET:
            sets = [sorted(ranks, key=lambda r: (self._at(r, j), r))[:k] for j in buckets]
            posts = [self._at(sets[j][-1], j) for j in buckets]
            closed = max(posts)
        else:
            by = 0 if self.inclusion is Inclusion.FIRST else -1
            chosen = sorted(ranks, key=lambda r: (self._at(r, by), r))[:k]
            sets = [chosen] * len(self.comm_s)
            closed = self._at(chosen[-1], by)
            if self.inclusion is Inclusion.FIRST:
                posts = [max(self._at(r, j) for r in chosen) for j in buckets]
            else:  # every bucket travels after the k-th whole gradient
                posts = [closed] * len(self.comm_s)
        done = -math.inf
        for post, comm in zip(posts, self.comm_s):
            done = max(done, post) + comm
        return sets, closed, done + self.close_s

    def close(self, k: int) -> tuple[list[list[int]], dict[int, float]]:
        """Run until the current step closes with ``k`` ranks in for every bucket. Returns, per bucket, the ranks
        in for it in the order they had it ready, and the seconds of work of every gradient of the ranks in for
        any bucket and of those that came after their step had closed (as :meth:`Schedule.close`)."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k={k} must satisfy 1 <= k <= n={self.n}")
        seconds, self._dropped = self._dropped, {}
        while True:
            sets, closed, end = self._decide(k)
            # A gradient on superseded parameters that finished before this step closed is dropped, and its rank
            # starts on this step's parameters (later than that, it waits for the next step's: below).
            stale = [r for r in range(self.n) if self._on[r] < self.version and self._at(r, -1) < closed]
            if not stale:
                break
            rank = min(stale, key=lambda r: (self._at(r, -1), r))
            seconds[rank] = self._offsets[rank][-1]
            self._begin(rank, max(self._at(rank, -1), self.time))
        counted = {r for members in sets for r in members}
        for rank in counted:
            seconds[rank] = self._offsets[rank][-1]
        self.version += 1
        self.time = end
        for rank in range(self.n):  # done by the time the update exists: start on it then
            if self._at(rank, -1) <= end:
                if rank not in counted:
                    self._dropped[rank] = self._offsets[rank][-1]
                self._begin(rank, end)
        return sets, seconds
