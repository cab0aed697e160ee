"""A zero-overhead event simulation of the backup-worker protocol.

Ranks compute gradients; a step closes at the k-th arrival of a gradient computed on that step's parameters
(k = N - b), instantly; the included ranks start the next step at once; a rank that finishes on superseded
parameters restarts on the newest ones as soon as they exist (the catch-up). Communication and updates take no
time unless a ``comm_s`` per step is given, which is added to every step's close. This is the "ideal" the
overhead benchmark compares measured runs with, the engine of the b-planner, and the clock of the virtual
cluster (:mod:`hvd_backup.planning.virtual`), which steps it one close at a time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["Schedule", "simulate"]


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
