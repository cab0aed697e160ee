"""Seconds a virtual worker needs for each gradient: a compute time (fixed, or measured in a real run's metrics
file) plus the delay the trainer's own straggler injector draws for that worker and step; with the gradient in
buckets (:class:`BucketTimes`), when each bucket is ready, given where in the step the delay falls."""

from __future__ import annotations

import numpy as np

from mpi_tools.straggler import StragglerInjector

from ...train.metrics import of_type, read_metrics
from ..plan import Workload

__all__ = ["DELAY_AT", "BucketTimes", "WorkTimes", "trace_compute"]

# Where a worker's delay falls in its step: before the forward pass (the trainer's injector: slow data, a busy
# host), spread over the whole compute (a slower device), or as one pause at a uniformly drawn point of the
# backward pass (a preemption, a collector, a throttled device).
DELAY_AT = ("start", "spread", "backward")


class WorkTimes:
    """``work(rank, version)``: seconds worker ``rank`` needs for a gradient on the parameters of step ``version``,
    its compute time plus the delay ``straggler`` injects at that step, drawn exactly as the trainer draws it for
    ``seed``.

    The compute time is ``compute`` seconds, or comes from a measured ``table`` (one row per step, one column
    per rank, NaN where nothing was measured): with as many columns as workers it is replayed row by row, each
    row serving ``per_row`` versions, so that ranks slowed down together (a busy machine) stay together; with
    another number of workers each draws from all the measured values."""

    def __init__(self, n: int, *, compute: float = 0.0, table: np.ndarray | None = None, per_row: int = 1,
                 straggler: str | None = None, seed: int = 0):
        self.n, self.compute, self.per_row = n, compute, per_row
        self.injector = StragglerInjector(straggler, rank=0, size=n, seed=seed)
        self.table = self.pool = None
        if table is not None:
            values = table[np.isfinite(table)]
            if values.size == 0:
                raise ValueError("the trace has no measured compute time")
            if table.shape[1] == n:
                # Where a rank has no measurement at a step, the median of the others' there (the same load).
                rows = np.nanmedian(table, axis=1)
                self.table = np.where(np.isfinite(table), table, rows[:, None])[np.isfinite(rows)]
            else:
                self.pool = values
                self.rngs = [np.random.default_rng([seed, rank]) for rank in range(n)]

    def __call__(self, rank: int, version: int) -> float:
        return sum(self.parts(rank, version))

    def parts(self, rank: int, version: int) -> tuple[float, float]:
        """The compute time and the injected delay of that gradient."""
        if self.table is not None:
            base = float(self.table[(version // self.per_row) % len(self.table), rank])
        elif self.pool is not None:
            base = float(self.pool[self.rngs[rank].integers(len(self.pool))])
        else:
            base = self.compute
        return base, self.injector.delay(version, base, rank=rank)


class BucketTimes:
    """``ready(rank, version)``: seconds from the start of a gradient to each bucket's readiness, for
    :class:`~hvd_backup.planning.simulate.BucketSchedule`. The forward pass is ``1 - backward_fraction`` of the
    compute time; the backward pass produces the buckets in order, each taking its share ``sizes`` (bytes) of
    it; the delay falls where ``delay_at`` (:data:`DELAY_AT`) says, a pause's point drawn per (seed, rank,
    version)."""

    def __init__(self, work: WorkTimes, sizes: list[float], *, backward_fraction: float = 0.67,
                 delay_at: str = "start", seed: int = 0):
        if delay_at not in DELAY_AT:
            raise ValueError(f"delay_at={delay_at!r}: one of {', '.join(DELAY_AT)}")
        if not 0 <= backward_fraction <= 1:
            raise ValueError(f"backward_fraction={backward_fraction}: between 0 and 1")
        self.work, self.delay_at, self.seed = work, delay_at, seed
        self.done = np.cumsum(sizes) / float(sum(sizes))  # the share of the backward pass done at each bucket
        self.done[-1] = 1.0
        self.share = (1.0 - backward_fraction) + backward_fraction * self.done  # of the compute, per bucket

    def __call__(self, rank: int, version: int) -> list[float]:
        base, delay = self.work.parts(rank, version)
        if self.delay_at == "start":
            offsets = delay + base * self.share
        elif self.delay_at == "spread":
            offsets = (base + delay) * self.share
        else:
            pause_at = np.random.default_rng([self.seed, rank, version, 0xB0C]).random()
            offsets = base * self.share + delay * (self.done > pause_at)
        return offsets.tolist()


def trace_compute(path: str, *, straggler: str | None = None, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Seconds per gradient measured in a metrics file of ``hvd-backup-train --metrics``, as a table with one row
    per step and one column per rank (NaN where nothing was measured), and what else the file says (``ranks``,
    ``mode``, ``overhead_s``: the fixed cost per step of a backup run, as the planner reads it; else 0).

    Given the ``straggler`` spec and ``seed`` the run was made with, the delays it injected are taken out (they
    are known for every step), leaving the compute times, to which :class:`WorkTimes` adds them back. What each
    mode records: backup runs every included rank's compute time (computed on its step's parameters); async
    runs rank 0's own updates, each its compute, delay and push and pull (the fixed cost per update is in the
    row); sync runs rank 0's steps, each the slowest rank's compute and delay plus the step's fixed cost (in
    the row, with every rank given the same compute). The first step and every step that began with an
    evaluation are left out: the virtual clock does not count evaluations."""
    records = read_metrics(path)
    steps = of_type(records, "step")
    if not steps:
        raise ValueError(f"--trace {path}: no step records (write them with hvd-backup-train --metrics FILE)")
    n = steps[0]["size"]
    injector = StragglerInjector(straggler, rank=0, size=n, seed=seed)
    if any(term.kind == "slow" for term in injector.terms):
        raise ValueError("--trace-straggler: 'slow' delays depend on the previous compute time and cannot be "
                         "taken out of a trace")
    mode = "backup" if steps[0].get("compute_s") else "async" if "staleness" in steps[0] else "sync"
    rows, after_eval, first = [], False, True
    for record in records:
        if record.get("type") == "eval":
            after_eval = True
        if record.get("type") != "step":
            continue
        skip, after_eval, first = after_eval or first, False, False
        if skip:
            continue
        t = record["step"]
        if mode == "backup":
            row = np.full(n, np.nan)
            for rank in record["included"]:
                if record["compute_s"][rank] is not None:
                    row[rank] = record["compute_s"][rank] - injector.delay(t, rank=rank)
        elif mode == "async":  # computed on the version it read
            row = np.full(n, record["step_s"] - injector.delay(t - record["staleness"], rank=0))
        else:
            row = np.full(n, record["step_s"] - max(injector.delay(t, rank=rank) for rank in range(n)))
        rows.append(np.maximum(row, 0.0))
    info = {"ranks": n, "mode": mode, "steps": len(steps), "overhead_s": 0.0}
    if mode == "backup":
        info["overhead_s"] = Workload.from_trace(path)[1]["overhead_s"]
    return np.array(rows).reshape(-1, n), info
