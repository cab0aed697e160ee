"""A zero-overhead event simulation of the backup-worker protocol.

Ranks compute gradients; a step closes at the k-th arrival of a gradient computed on that step's parameters
(k = N - b), instantly; the included ranks start the next step at once; a rank that finishes on superseded
parameters restarts at once on the newest ones (the catch-up). Communication and updates take no time unless a
``comm_s`` per step is given, which is added to every step's close. This is the "ideal" the overhead benchmark
compares measured runs with, and the engine of the b-planner.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["simulate"]


def simulate(n: int, b: int, steps: int, work: Callable[[int, int], float], comm_s: float = 0.0) -> dict:
    """Simulate ``steps`` global steps on ``n`` ranks with ``b`` backup workers.

    ``work(rank, version)`` is the seconds rank ``rank`` needs for a gradient on the parameters of global step
    ``version`` (compute plus any delay). Returns ``{"time": seconds for all steps, "step_times": [...],
    "included": [[ranks], ...]}``.
    """
    if not 0 <= b < n:
        raise ValueError(f"b={b} must satisfy 0 <= b < n={n}")
    k = n - b
    heap = [(work(r, 0), r, 0) for r in range(n)]  # (ready time, rank, version it computed on)
    heapq.heapify(heap)
    version, waiting, last_close = 0, [], 0.0
    step_times, included = [], []
    while version < steps:
        ready, rank, on = heapq.heappop(heap)
        if on < version:  # finished on superseded parameters: restart on the newest ones
            heapq.heappush(heap, (ready + work(rank, version), rank, version))
            continue
        waiting.append(rank)
        if len(waiting) < k:
            continue
        close = ready + comm_s
        step_times.append(close - last_close)
        included.append(sorted(waiting))
        last_close = close
        version += 1
        for r in waiting:
            heapq.heappush(heap, (close + work(r, version), r, version))
        waiting = []
    return {"time": last_close, "step_times": step_times, "included": included}
