"""``hvd_backup.DistributedOptimizer``: Horovod's optimizer wrapper, with backup workers.

    opt = hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                          named_parameters=model.named_parameters(), backup_workers=1)

The returned object is an instance of a subclass of the wrapped optimizer's class that shares its parameter
groups and state (as Horovod does), so schedulers, ``state_dict()`` and ``zero_grad()`` work unchanged.
``step()`` runs one global step of the protocol in :mod:`hvd_backup.protocol`.
"""

from __future__ import annotations

import atexit
import time
import weakref

import torch
from mpi4py import MPI

from . import settings as rules
from .backends import make_backend
from .errors import same_on_every_rank
from .protocol import StepEngine
from .records import StepRecord
from .tensors import Consensus

__all__ = ["DistributedOptimizer"]


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters=None,
    *,
    backup_workers: int | str = 1,
    straggler_timeout: float | None = None,
    min_workers: int | None = None,
    hang_timeout: float = 600.0,
    max_lag: int | None = None,
    backend: str = "horovod",
    comm: MPI.Intracomm | None = None,
    auto_every: int = 50,
    max_backup_workers: int | None = None,
):
    """Wrap ``optimizer`` for synchronous SGD that waits for the first N - ``backup_workers`` ranks each step.

    Collective: every rank of ``comm`` (default ``MPI.COMM_WORLD``) calls it with the same settings and model;
    a difference, or a bad value, raises ``ValueError`` on every rank.

    Args:
        optimizer: any ``torch.optim.Optimizer``; its parameter groups and state are taken over.
        named_parameters: ``model.named_parameters()``, used to name parameters in errors (optional).
        backup_workers: b, the number of slowest ranks each step does without (0 <= b < N; 0 is plain sync),
            or ``"auto"``: re-chosen every ``auto_every`` steps between 0 and ``max_backup_workers`` (default
            N // 4) for the highest throughput, from the arrival records (:mod:`hvd_backup.protocol.adaptive`).
        straggler_timeout: seconds after a step's first arrival after which the step closes with the ranks
            that arrived (at least ``min_workers``); ``None`` waits for N - b.
        min_workers: the fewest arrivals a timeout may close a step with (1 <= min_workers <= N - b;
            default 1).
        hang_timeout: seconds a rank waits for a step's allreduce before failing the job with an error that
            names the ranks that never contributed.
        max_lag: fail if this rank's training thread falls more than this many steps behind (default: never).
        backend: ``"horovod"`` (``hvd.init()`` first) or ``"mpi"`` (mpi4py only; no Horovod needed).
        comm: the mpi4py communicator of the ranks (default ``MPI.COMM_WORLD``).
    """
    base = optimizer.__class__
    if isinstance(optimizer, _BackupOptimizer):
        raise ValueError("hvd_backup: the optimizer is already a hvd_backup.DistributedOptimizer")
    cls = type(base.__name__, (_BackupOptimizer, base), {})
    return cls(
        optimizer,
        named_parameters,
        backup_workers=backup_workers,
        straggler_timeout=straggler_timeout,
        min_workers=min_workers,
        hang_timeout=hang_timeout,
        max_lag=max_lag,
        backend=backend,
        comm=comm,
        auto_every=auto_every,
        max_backup_workers=max_backup_workers,
    )


class _BackupOptimizer(torch.optim.Optimizer):
    """Mixed in before the wrapped optimizer's class; see :func:`DistributedOptimizer`."""

    def __init__(self, optimizer, named_parameters, *, backup_workers, straggler_timeout, min_workers,
                 hang_timeout, max_lag, backend, comm, auto_every, max_backup_workers):
        # Take over the wrapped optimizer's groups, state and hooks as they are (no re-initialisation).
        self.__dict__.update(optimizer.__dict__)
        base = type(self).__mro__[2]
        comm = comm if comm is not None else MPI.COMM_WORLD
        names = {}
        if named_parameters is not None:
            names = {p: n for n, p in named_parameters}
        consensus = Consensus(self, base, names)
        values = dict(backup_workers=backup_workers, straggler_timeout=straggler_timeout, min_workers=min_workers,
                      hang_timeout=hang_timeout, max_lag=max_lag, backend=backend, auto_every=auto_every,
                      max_backup_workers=max_backup_workers)
        same_on_every_rank(comm, dict(values, optimizer=base.__name__, parameters=consensus.signature(),
                                      hyper_parameters=consensus.hyper.signature()), lambda k: f"hvd_backup: {k}")
        size = comm.Get_size()
        checked = rules.check(values, size=size, spell=lambda k, v: f"hvd_backup: {k}={v!r}")
        b, b_max, min_workers = checked.b, checked.b_max, checked.min_workers
        self._hvdb_base = base
        self._hvdb_consensus = consensus
        self.straggler_timeout = straggler_timeout
        self.min_workers = min_workers
        self.hang_timeout = float(hang_timeout)
        self.max_lag = max_lag
        self._hvdb_engine = StepEngine(
            consensus,
            backend=make_backend(backend, comm),
            quorum=size - b,
            straggler_timeout=straggler_timeout,
            min_workers=min_workers,
            hang_timeout=self.hang_timeout,
            max_lag=max_lag,
            hyper_len=len(consensus.hyper.fields),
        )
        if b_max is not None:
            from .protocol.adaptive import AutoBackup

            self._hvdb_engine.auto = AutoBackup(size, every=auto_every, b_min=0, b_max=b_max)
        self._hvdb_engine.start()
        self._hvdb_ready_at = time.monotonic()
        self._hvdb_closed = False
        self.last_step: StepRecord | None = None
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    # --- what users call ---------------------------------------------------------------------------------------

    @property
    def backup_workers(self) -> int:
        """b in force now (with ``backup_workers="auto"`` it changes every ``auto_every`` steps)."""
        return self._hvdb_engine.size - self._hvdb_engine.quorum

    @property
    def size(self) -> int:
        return self._hvdb_engine.size

    @property
    def rank(self) -> int:
        return self._hvdb_engine.rank

    @property
    def global_step(self) -> int:
        """The number of updates applied to this rank's parameters (the same on all ranks after ``step()``)."""
        return self._hvdb_engine.version

    def step(self, closure=None, *, loss=None):
        """Hand in this rank's gradients and return once its parameters hold the next global step.

        ``loss`` (optional; a closure's result is used when given) is shared with the other ranks in the
        step's records, so rank 0 can log the mean loss of the included ranks.

        ``self.last_step`` then says what happened: who was included, and whether this rank's gradient
        counted (``"included"``), came too late (``"dropped"``), or was computed on parameters that were
        already superseded, so that it was discarded and the parameters caught up (``"caught_up"``).
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reported = None if loss is None else float(loss)
        if self._hvdb_closed:
            raise RuntimeError("hvd_backup: step() after close()")
        engine = self._hvdb_engine
        compute_s = time.monotonic() - self._hvdb_ready_at
        consensus = self._hvdb_consensus
        tic = time.perf_counter()
        consensus.flatten()
        engine.timings.add("flatten", time.perf_counter() - tic)
        tic = time.perf_counter()
        self.last_step = engine.submit(consensus.hyper.snapshot(self.param_groups), compute_s, reported)
        engine.timings.add("blocked_in_step", time.perf_counter() - tic)
        self._hvdb_ready_at = time.monotonic()
        return loss

    @property
    def stop_requested(self) -> bool:
        """True once some rank called :meth:`request_stop` and a step carried it: every rank sees it after
        the same global step, so ``while ... and not opt.stop_requested`` ends all ranks' loops together."""
        return self._hvdb_engine.stop_requested

    def request_stop(self) -> None:
        """Ask all ranks to stop after the next step (e.g. from a SIGUSR1 handler before preemption)."""
        self._hvdb_engine.request_stop()

    def keep_snapshots(self, every: int) -> None:
        """Keep a copy of the parameters at every global step that is a multiple of ``every``, so that all
        ranks can evaluate exactly that step even if some have moved past it (:meth:`parameters_at`)."""
        self._hvdb_engine.snapshot_every = int(every) if every else None

    def parameters_at(self, step: int) -> list[torch.Tensor] | None:
        """The parameters (in ``param_groups`` order) at global ``step``, kept by :meth:`keep_snapshots`."""
        return self._hvdb_engine.take_snapshot(step)

    def timings(self, reset: bool = False) -> dict[str, tuple[float, int]]:
        """Where this rank's time went: ``{phase: (seconds, count)}`` for flatten, blocked_in_step, arrive,
        allreduce (waiting for the step's reductions), reduce (reweighting), apply and catch_up."""
        return self._hvdb_engine.timings.snapshot(reset)

    def pop_records(self) -> list[StepRecord]:
        """Records of every step completed since the last call (rank-independent fields), oldest first."""
        records = self._hvdb_engine.records
        out = []
        while records:
            out.append(records.popleft())
        return out

    def state_dict(self):
        state = self._hvdb_base.state_dict(self)
        state["hvd_backup"] = {"global_step": self.global_step}
        return state

    def load_state_dict(self, state_dict) -> None:
        """Load a checkpoint on every rank before the first ``step()``; restores the global step too."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("hvd_backup", None)
        if extra is not None:
            self._hvdb_engine.rebase(int(extra["global_step"]))
        self._hvdb_base.load_state_dict(self, state_dict)

    def close(self) -> None:
        """Stop the protocol's threads and free its MPI resources. Collective: every rank calls it after its
        last ``step()`` (``with`` does it too)."""
        if self._hvdb_closed:
            return
        self._hvdb_closed = True
        engine = self._hvdb_engine
        engine.stop()
        engine.free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
