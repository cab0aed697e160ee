"""What communication costs on the virtual clock: the planner's allreduce and counter terms for synchronous
steps, and moving the model through the parameters' holder for asynchronous updates."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import allreduce_seconds

__all__ = ["Network"]


@dataclass
class Network:
    """Communication time. ``bandwidth`` None: no transfer terms, only the fixed costs (as measured on a
    machine whose ranks share memory, where the fixed cost already holds the allreduce)."""

    overhead_s: float = 0.0  # sync and backup: fixed seconds per step besides the allreduce (update, hand-offs)
    update_overhead_s: float = 0.0  # async: fixed seconds per update besides moving the model
    bandwidth: float | None = 12.5e9  # bytes per second per link
    latency_s: float = 5e-6  # per message
    algorithm: str = "ring"  # of the allreduce
    atomic_s: float = 2e-6  # one fetch-and-op at the counter's host (arrivals are serialized there)
    model_bytes: float | None = None  # bytes of one copy of the model on the wire (None: the model's own)

    def step_s(self, n: int, nbytes: float, *, counter: bool) -> float:
        """Seconds added to every synchronous step: fixed cost, allreduce, and (backup workers) the counter's N
        atomics."""
        return self.bucket_s(n, nbytes) + self.close_s(n, counters=int(counter))

    def bucket_s(self, n: int, nbytes: float) -> float:
        """Seconds of one allreduce of ``nbytes`` (a bucket, or the whole gradient; no fixed cost: :meth:`close_s`
        has it)."""
        if self.bandwidth is None:
            return 0.0
        return allreduce_seconds(n, nbytes, self.bandwidth, self.latency_s, self.algorithm)

    def close_s(self, n: int, *, counters: int) -> float:
        """Seconds after a bucketed step's last allreduce: the fixed cost, and N atomics on each of ``counters``
        counter words (one per step, or one per bucket)."""
        return self.overhead_s + (0.0 if self.bandwidth is None else counters * n * self.atomic_s)

    def transfer_s(self, nbytes: float) -> float:
        """Seconds one copy of the model occupies one link."""
        return 0.0 if self.bandwidth is None else nbytes / self.bandwidth

    def update_s(self) -> float:
        """Fixed seconds of one async update: its own overhead, a push's and a pull's latency, and the two
        atomics on the version word."""
        return self.update_overhead_s + (0.0 if self.bandwidth is None else 2 * (self.latency_s + self.atomic_s))
