"""Asynchronous SGD without a parameter server (the paper's Async-Opt baseline), on one-sided MPI.

The parameters live in an MPI RMA window on rank 0. Every rank, on its own schedule: reads the current
parameters (``MPI_Get``), computes a gradient on them, and adds its update back with ``MPI_Accumulate`` (an
element-wise atomic sum), never waiting for anyone. A counter word in the same window numbers the updates;
an update's *staleness* is how many other updates landed between its read and its write. Each rank keeps
its own momentum buffer (momentum on its own gradients, as asynchronous SGD implementations usually do).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from ..backends import MPI_TYPES
from ..records import ClosedBy, Status, StepRecord
from ..tensors import flat_views
from .loop import LoopOptimizer

__all__ = ["AsyncOptimizer"]


class AsyncOptimizer(LoopOptimizer):
    """Asynchronous SGD with momentum over ``base``'s parameters (an SGD optimizer, whose ``lr``, ``momentum``
    and ``weight_decay`` are used). Collective constructor and :meth:`close`; ``step()`` is not collective."""

    def __init__(self, base: torch.optim.Optimizer, *, comm: MPI.Intracomm | None = None, root: int = 0):
        self.comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        super().__init__(self.comm.Get_size(), self.comm.Get_rank())
        self.base = base
        self.param_groups = base.param_groups
        self.root = root
        self.params = [p for g in base.param_groups for p in g["params"] if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1 or next(iter(dtypes)) not in MPI_TYPES:
            raise ValueError("hvd_backup: --mode async needs float32 or float64 parameters, got "
                             f"{sorted(map(str, dtypes))}")
        self.dtype = MPI_TYPES[dtypes.pop()]
        self.numel = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(self.numel, dtype=self.params[0].dtype)  # this rank's copy, on the CPU
        self.momentum = torch.zeros_like(self.flat)
        self._ignored = torch.zeros_like(self.flat)  # the origin of a read (Open MPI wants one of full size)
        itemsize = self.flat.element_size()
        # Window on the root: the parameters; a second one-word window numbers the updates.
        self.win = MPI.Win.Allocate(self.numel * itemsize if self.rank == root else 0, itemsize, comm=self.comm)
        self.version_win = MPI.Win.Allocate(8 if self.rank == root else 0, 8, comm=self.comm)
        self._read_version = 0
        self._started = False

    # --- the window ----------------------------------------------------------------------------------------

    def _version(self, add: int = 0) -> int:
        one = np.array([add], dtype=np.int64)
        result = np.zeros(1, dtype=np.int64)
        self.version_win.Fetch_and_op([one, MPI.INT64_T], [result, MPI.INT64_T], self.root, 0,
                                      MPI.SUM if add else MPI.NO_OP)
        self.version_win.Flush(self.root)
        return int(result[0])

    def _start(self) -> None:
        """Collective: the root publishes its initial parameters; everyone opens the access epochs."""
        if self.rank == self.root:
            with torch.no_grad():
                for p, v in zip(self.params, flat_views(self.params, self.flat)):
                    v.copy_(p.detach().cpu())
            self.win.Lock(self.root, MPI.LOCK_EXCLUSIVE)
            self.win.Put([self.flat.numpy(), self.dtype], self.root)
            self.win.Unlock(self.root)
            self.version_win.Lock(self.root, MPI.LOCK_EXCLUSIVE)
            self.version_win.Put([np.array([self.global_step], dtype=np.int64), MPI.INT64_T], self.root)
            self.version_win.Unlock(self.root)
        self.comm.Barrier()
        self.win.Lock_all()
        self.version_win.Lock_all()
        self._started = True
        self._pull()

    def _pull(self) -> None:
        """Read the current parameters (and their version) into the model. The read is an accumulate with
        ``MPI_NO_OP``, atomic per element with the other ranks' ``MPI_Accumulate`` (a plain ``MPI_Get`` is not);
        the version is read after it, so an update counts as seen once it could be in what was read."""
        self.win.Get_accumulate([self._ignored.numpy(), self.dtype], [self.flat.numpy(), self.dtype], self.root,
                                op=MPI.NO_OP)
        self.win.Flush(self.root)
        self._read_version = self._version()
        with torch.no_grad():
            for p, v in zip(self.params, flat_views(self.params, self.flat)):
                p.copy_(v)
        self.global_step = self._read_version

    # --- the optimizer interface the trainer uses ----------------------------------------------------------

    def zero_grad(self):
        self.base.zero_grad()

    def step(self, loss=None) -> None:
        """Push this gradient's update into the shared parameters, then read the newest ones. Never waits."""
        if not self._started:
            self._start()
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group.get("momentum", 0.0), group.get("weight_decay", 0.0)
        t0 = time.monotonic()
        with torch.no_grad():
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).cpu()
                              for p in self.params])
            if wd:
                grad.add_(torch.cat([p.detach().reshape(-1).cpu() for p in self.params]), alpha=wd)
            self.momentum.mul_(mu).add_(grad)
            update = (-lr * self.momentum).contiguous()
        self.win.Accumulate([update.numpy(), self.dtype], self.root, op=MPI.SUM)
        self.win.Flush(self.root)
        written = self._version(1)
        staleness = written - self._read_version
        now = time.monotonic()
        self._record(StepRecord(written, self.size, 1, (self.rank,), ClosedBy.ASYNC, Status.INCLUDED, now - t0, (),
                                (), now - self._last, (None if loss is None else float(loss),), staleness=staleness,
                                quorum=1))
        self._pull()
        if self._stop_wanted:
            self.stop_requested = True

    def state_dict(self):
        """The global step and this rank's momentum (rank 0's is what a checkpoint keeps)."""
        return {"state": {}, "param_groups": [], "hvd_backup": {"global_step": self.global_step, "mode": "async",
                                                                "momentum": self.momentum.clone()}}

    def load_state_dict(self, state):
        extra = state.get("hvd_backup", {})
        self.global_step = int(extra.get("global_step", 0))
        if "momentum" in extra:
            self.momentum.copy_(extra["momentum"])

    def close(self) -> None:
        """Collective: wait for every rank's last update, then give every rank the final parameters."""
        if not self._started:
            self._start()
        self.comm.Barrier()
        self._pull()
        self.comm.Barrier()
        self.win.Unlock_all()
        self.version_win.Unlock_all()
        self.win.Free()
        self.version_win.Free()
        self.comm.Free()
