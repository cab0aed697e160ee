"""Plain synchronous SGD through ``hvd.DistributedOptimizer`` (``--mode sync``), behind the loop interface."""

from __future__ import annotations

import time

import torch

from ..records import ClosedBy, Status, StepRecord
from .loop import LoopOptimizer

__all__ = ["SyncOptimizer"]


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
        losses = (None if loss is None else float(loss),) + (None,) * (self.size - 1)
        self._record(StepRecord(self.global_step, self.size, self.size, everyone, ClosedBy.ALL, Status.INCLUDED,
                                now - t0, (), (), now - self._last, losses, quorum=self.size))
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
