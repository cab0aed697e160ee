"""The comparison baselines behind the trainer's loop: plain synchronous Horovod (``--mode sync``) and
asynchronous SGD (``--mode async``, :mod:`hvd_backup.async_sgd`), with the interface the loop uses for
``hvd_backup.DistributedOptimizer`` (global step, step records, stop requests, snapshots)."""

from __future__ import annotations

import time

import torch

from .protocol import StepRecord

__all__ = ["LoopOptimizer", "SyncOptimizer"]


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


class SyncOptimizer(LoopOptimizer):
    """``hvd.DistributedOptimizer``, the plain synchronous baseline."""

    def __init__(self, hvd, opt, comm):
        super().__init__(comm.Get_size(), comm.Get_rank())
        self.hvd, self.opt = hvd, opt
        self.param_groups = opt.param_groups

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self, loss=None):
        t0 = time.monotonic()
        self.opt.step()
        now = time.monotonic()
        everyone = tuple(range(self.size))
        self._record(StepRecord(self.global_step, self.size, self.size, everyone, "all", "included", now - t0, (),
                                (), now - self._last, (None if loss is None else float(loss),) + (None,) * (self.size - 1),
                                quorum=self.size))
        self.global_step += 1
        if self.global_step % 10 == 0:  # agree on a stop request every few steps (one tiny allreduce)
            flag = torch.tensor([1.0 if self._stop_wanted else 0.0])
            self.stop_requested = bool(self.hvd.allreduce(flag, op=self.hvd.Max, name="hvd_backup.stop")[0] > 0)

    def state_dict(self):
        return dict(self.opt.state_dict(), hvd_backup={"global_step": self.global_step})

    def load_state_dict(self, state):
        state = dict(state)
        extra = state.pop("hvd_backup", {"global_step": 0})
        self.opt.load_state_dict(state)
        self.global_step = int(extra["global_step"])

    def close(self):
        pass
