"""What the trainer's loop needs from an optimizer besides ``hvd_backup.DistributedOptimizer``'s own: global
step, step records, stop requests that ranks agree on, snapshots. The baselines share it."""

from __future__ import annotations

import time

from ..records import StepRecord

__all__ = ["LoopOptimizer"]


class LoopOptimizer:
    """What the two baselines share: records of this rank's steps and a stop request that ranks agree on."""

    def __init__(self, size: int, rank: int):
        self.size, self.rank = size, rank
        self.global_step = 0
        self._stop_wanted = False
        self.stop_requested = False
        self._records: list[StepRecord] = []
        self.last_step: StepRecord | None = None
        self._last = time.monotonic()

    def _record(self, rec: StepRecord) -> None:
        self._last = time.monotonic()
        self._records.append(rec)
        self.last_step = rec

    def pop_records(self) -> list[StepRecord]:
        out, self._records = self._records, []
        return out

    def request_stop(self) -> None:
        self._stop_wanted = True

    def keep_snapshots(self, every) -> None:
        pass  # no rank ever skips a step to evaluate (sync), or there is no common step (async)

    def parameters_at(self, step):
        return None  # evaluate the live parameters
