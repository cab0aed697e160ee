"""``hvd_backup.DistributedOptimizer``: Horovod's optimizer wrapper, with backup workers.

    opt = hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                          named_parameters=model.named_parameters(), backup_workers=1)

The returned object is an instance of a subclass of the wrapped optimizer's class that shares its parameter
groups and state (as Horovod does), so schedulers, ``state_dict()`` and ``zero_grad()`` work unchanged.
``step()`` hands the gradients to the protocol (:mod:`hvd_backup.protocol`), which owns every other decision.
"""

from __future__ import annotations

import hashlib
import itertools
import time

import torch
from mpi4py import MPI

from . import amp, lifecycle
from . import settings as rules
from .backends import make_backend
from .buckets import Buckets, bucket_groups
from .errors import ProtocolError, same_on_every_rank
from .horovod_compat import resolve
from .protocol import StepEngine
from .protocol.adaptive import AutoBackup
from .records import StepRecord
from .schedulers import SchedulerFollower
from .tensors import Consensus

__all__ = ["DistributedOptimizer"]

_instances = itertools.count()  # every rank creates its optimizers in the same order (the constructor is collective)


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters=None,
    compression=None,
    backward_passes_per_step: int = 1,
    op=None,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups=None,
    sparse_as_dense: bool = False,
    process_set=None,
    *,
    backup_workers: int | str = 1,
    straggler_timeout: float | None = None,
    min_workers: int | None = None,
    hang_timeout: float = 600.0,
    startup_timeout: float | None = None,
    max_lag: int | None = None,
    detach_after: int | None = None,
    backend: str = "horovod",
    comm: MPI.Intracomm | None = None,
    auto_every: int = 50,
    max_backup_workers: int | None = None,
    history: int = 1024,
    overlap: bool = False,
    bucket_cap_mb: float = 25.0,
):
    """Wrap ``optimizer`` for synchronous SGD that waits for the first N - ``backup_workers`` ranks each step.

    Collective: every rank of ``comm`` (default ``MPI.COMM_WORLD``) calls it with the same settings and model;
    a difference, or a bad value, raises ``ValueError`` on every rank.

    Args:
        optimizer: any ``torch.optim.Optimizer``; its parameter groups and state are taken over.
        named_parameters: ``model.named_parameters()``, used to name parameters in errors (optional).
        compression, backward_passes_per_step, op, gradient_predivide_factor, num_groups, groups,
            sparse_as_dense, process_set: Horovod's keywords, with Horovod's meaning
            (:mod:`hvd_backup.horovod_compat`); ``op=hvd.Sum`` sums over the included ranks.
        backup_workers: b, the number of slowest ranks each step does without (0 <= b < N; 0 is plain sync),
            or ``"auto"``: re-chosen every ``auto_every`` steps between 0 and ``max_backup_workers`` (default
            N // 4) for the highest throughput, from the arrival records (:mod:`hvd_backup.protocol.adaptive`).
        straggler_timeout: seconds after a step's first arrival after which the step closes with the ranks
            that arrived (at least ``min_workers``); ``None`` waits for N - b.
        min_workers: the fewest arrivals a timeout may close a step with (1 <= min_workers <= N - b;
            default 1).
        hang_timeout: seconds a rank waits for a step before failing the job with an error that names the
            ranks that never contributed. ``startup_timeout`` (default: the same) is for the first step, which
            waits for every rank.
        max_lag: fail if this rank's training thread falls more than this many steps behind (default: never).
        detach_after: detach a rank behind a slow link: after this many slow steps in a row (over 4 times the
            usual step) blamed on its link (its arrival at the counter's host took over 5 times its usual), the
            others reduce among themselves (a communicator of their own), so its link stops pacing their steps.
            While detached, each of its ``step()`` calls is answered with rank 0's current parameters and
            optimizer state (``caught_up``); after 5 s (doubling with each detachment, at most 60 s) or at
            ``close()`` it is attached again at an agreed step. Never rank 0; only while N - b ranks stay
            attached; ``backend="mpi"`` only. Default: never (:mod:`hvd_backup.protocol.detach`).
        backend: ``"horovod"`` (``hvd.init()`` first) or ``"mpi"`` (mpi4py only; no Horovod needed).
        comm: the mpi4py communicator of the ranks (default ``MPI.COMM_WORLD``).
        history: how many step records :meth:`pop_records` keeps when nobody pops them.
        overlap: hand the gradient in bucket by bucket during the backward pass, so that the allreduces run
            while it goes on (:mod:`hvd_backup.buckets`); the rank arrives, and so is in or out of the step,
            with its first bucket. Horovod's rules then hold: gradient accumulation needs
            ``backward_passes_per_step``, and ``.grad`` edited after ``backward()`` does not travel (use a step
            pre-hook).
        bucket_cap_mb: with ``overlap``, about how many MiB of gradient each bucket holds (the first: 1 MiB).
    """
    base = optimizer.__class__
    if isinstance(optimizer, _BackupOptimizer):
        raise ValueError("hvd_backup: the optimizer is already a hvd_backup.DistributedOptimizer")
    cls = type(base.__name__, (_BackupOptimizer, base), {})
    horovod = dict(compression=compression, backward_passes_per_step=backward_passes_per_step, op=op,
                   gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups, groups=groups,
                   sparse_as_dense=sparse_as_dense, process_set=process_set)
    return cls(optimizer, named_parameters, horovod, backup_workers=backup_workers,
               straggler_timeout=straggler_timeout, min_workers=min_workers, hang_timeout=hang_timeout,
               startup_timeout=startup_timeout, max_lag=max_lag, detach_after=detach_after, backend=backend,
               comm=comm, auto_every=auto_every, max_backup_workers=max_backup_workers, history=history,
               overlap=overlap, bucket_cap_mb=bucket_cap_mb)


class _BackupOptimizer(torch.optim.Optimizer):
    """Mixed in before the wrapped optimizer's class; see :func:`DistributedOptimizer`."""

    # GradScaler hands itself to step() (amp.py) rather than unscaling and skipping on this rank's own verdict.
    _step_supports_amp_scaling = True

    def __init__(self, optimizer, named_parameters, horovod: dict, *, comm, history, **values):
        # Take over the wrapped optimizer's groups, state and hooks (no re-initialisation); not a method a
        # scheduler patched onto that instance (it would step the wrapped optimizer alone).
        self.__dict__.update({k: v for k, v in optimizer.__dict__.items() if k != "step"})
        base = type(self).__mro__[2]
        comm = comm if comm is not None else MPI.COMM_WORLD
        level = MPI.Query_thread()
        if level < MPI.THREAD_MULTIPLE:
            names = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED", MPI.THREAD_SERIALIZED: "SERIALIZED"}
            raise RuntimeError(f"hvd_backup: MPI was initialised with MPI_THREAD_{names.get(level, level)}, but the "
                               "protocol's thread needs MPI_THREAD_MULTIPLE: let mpi4py initialise MPI (import "
                               "mpi4py.MPI before horovod, and no mpi4py.rc.thread_level or MPI4PY_RC_THREAD_LEVEL "
                               "below 'multiple')")
        names = {p: n for n, p in named_parameters} if named_parameters is not None else {}
        options = resolve(backend=values["backend"], **horovod)
        consensus = Consensus(self, base, names, sparse_as_dense=options.sparse_as_dense)
        same_on_every_rank(comm, dict(values, optimizer=base.__name__, parameters=consensus.signature(),
                                      hyper_parameters=consensus.hyper.signature(), op=options.op,
                                      compression=repr(options.compression)), lambda k: f"hvd_backup: {k}")
        size = comm.Get_size()
        checked = rules.check(values, size=size, spell=lambda k, v: f"hvd_backup: {k}={v!r}")
        self._hvdb_base, self._hvdb_wrapped, self._hvdb_comm = base, optimizer, comm
        self._hvdb_consensus, self._hvdb_options = consensus, options
        self._hvdb_names = [names.get(p, f"param[{i}]") for i, p in enumerate(consensus.all_params)]
        sizes = [p.numel() for p in consensus.params]
        groups = (bucket_groups(sizes, consensus.send.element_size(), values["bucket_cap_mb"])
                  if values["overlap"] else [range(len(sizes))])
        ranges = consensus.arrange(groups)
        self._hvdb_engine = StepEngine(
            consensus, backend=make_backend(values["backend"], comm, options.compression),
            quorum=size - checked.b, straggler_timeout=values["straggler_timeout"],
            min_workers=checked.min_workers, hang_timeout=float(values["hang_timeout"]),
            startup_timeout=values["startup_timeout"], max_lag=values["max_lag"],
            detach_after=values["detach_after"],
            hyper_len=len(consensus.hyper.fields), name=f"hvd_backup.{next(_instances)}", op=options.op,
            predivide=options.predivide, history=history, buckets=ranges)
        if checked.b_max is not None:
            self._hvdb_engine.auto = AutoBackup(size, every=values["auto_every"], b_min=0, b_max=checked.b_max)
        self.backward_passes_per_step = options.backward_passes_per_step
        self._hvdb_schedulers = SchedulerFollower(self, optimizer)
        self._hvdb_calls = 0
        self._hvdb_buckets = (Buckets(consensus, self._hvdb_engine, groups, options.backward_passes_per_step)
                              if values["overlap"] else None)
        self._hvdb_engine.start()
        self._hvdb_ready_at = time.monotonic()
        self._hvdb_closed = False
        self.last_step: StepRecord | None = None
        lifecycle.register(self)

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

    def step(self, closure=None, *, loss=None, grad_scaler=None):
        """Hand in this rank's gradients and return once its parameters hold the next global step.

        ``loss`` (optional; a closure's result is used when given) is shared with the other ranks in the
        step's records, so rank 0 can log the mean loss of the included ranks. ``grad_scaler`` is passed by
        ``torch.amp.GradScaler.step`` (:mod:`hvd_backup.amp`).

        ``self.last_step`` then says what happened: who was included, and whether this rank's gradient
        counted (``"included"``), came too late (``"dropped"``), or was computed on parameters that were
        already superseded, so that it was discarded and the parameters caught up (``"caught_up"``).
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._hvdb_closed:
            raise RuntimeError("hvd_backup: step() after close()")
        self._hvdb_consensus.check_unchanged()
        self._hvdb_schedulers.before_step(self, self._hvdb_calls)
        sub = self._hand_in(grad_scaler, loss)
        self.last_step = sub.reply
        if grad_scaler is not None:
            amp.after_step(grad_scaler, self, sub.covered)
        self._hvdb_schedulers.after_catch_up(self._hvdb_calls, len(sub.covered) - 1)
        self._hvdb_calls += 1
        self._opt_called = self._hvdb_wrapped._opt_called = True  # what schedulers check
        self._hvdb_ready_at = time.monotonic()
        return loss

    def _hand_in(self, grad_scaler, loss):
        engine, consensus, buckets = self._hvdb_engine, self._hvdb_consensus, self._hvdb_buckets
        compute_s = time.monotonic() - self._hvdb_ready_at
        tic = time.perf_counter()
        inv_scale = amp.before_step(grad_scaler, self) if grad_scaler is not None else None
        unscale = 1.0
        if buckets is None:
            consensus.flatten(inv_scale)
        else:  # the hooks took most gradients, still scaled: the sum is unscaled after the allreduce
            if grad_scaler is not None:
                unscale = float(grad_scaler._scale.double().reciprocal())
            buckets.flush(grad_scaler._scale if grad_scaler is not None and inv_scale is None else None)
        engine.timings.add("flatten", time.perf_counter() - tic)
        tic = time.perf_counter()
        try:
            return engine.submit(consensus.hyper.snapshot(self.param_groups), compute_s,
                                 None if loss is None else float(loss), amp=grad_scaler is not None, unscale=unscale)
        finally:
            if buckets is not None:
                buckets.reset()
            engine.timings.add("blocked_in_step", time.perf_counter() - tic)

    def zero_grad(self, set_to_none: bool = True):
        buckets = self._hvdb_buckets
        if buckets is not None and buckets.started:
            raise RuntimeError("hvd_backup: zero_grad() after backward() and before step(), with overlap=True: this "
                               "rank's gradients have already left. Call zero_grad() before backward(), or pass "
                               "overlap=False")
        self._hvdb_base.zero_grad(self, set_to_none=set_to_none)

    def synchronize(self):
        raise RuntimeError("hvd_backup: synchronize() has no meaning here: which gradients are averaged is only "
                           "decided inside step(). To clip or edit the averaged gradient, register it with "
                           "opt.register_step_pre_hook(hook) (the hook gets the optimizer to edit: clip "
                           "[p for g in optimizer.param_groups for p in g['params']])")

    def skip_synchronize(self):
        self.synchronize()

    def verify(self) -> None:
        """Collective (every rank, at the same global step, e.g. after the loop): raise ``ProtocolError`` on
        every rank if any parameter or optimizer state differs across ranks, naming the first that does."""
        digests = []
        for p in self._hvdb_consensus.all_params:
            h = hashlib.sha256(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            for key, value in sorted(self.state.get(p, {}).items()):
                if torch.is_tensor(value):
                    h.update(key.encode())
                    h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            digests.append(h.hexdigest())
        everyone = self._hvdb_comm.allgather((self.global_step, digests))
        for rank, (step, theirs) in enumerate(everyone):
            if step != everyone[0][0]:
                raise ProtocolError(f"hvd_backup: verify() called at global step {everyone[0][0]} on rank 0 but "
                                    f"{step} on rank {rank}: call it at the same step everywhere")
            for name, mine, other in zip(self._hvdb_names, everyone[0][1], theirs):
                if mine != other:
                    raise ProtocolError(f"hvd_backup: parameter {name} (or its optimizer state) differs between "
                                        f"rank 0 and rank {rank} at global step {step}")

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
        posted (from its part in a step until all of its allreduces were posted: with ``overlap``, the rest of
        its backward pass), allreduce (waiting for the step's reductions after that), reduce (reweighting),
        apply and catch_up; close_notice counts the steps whose close this rank learnt from a notice; with
        ``detach_after``, detached_state is the loading of states while detached."""
        return self._hvdb_engine.timings.snapshot(reset)

    def pop_records(self) -> list[StepRecord]:
        """Records of the steps completed since the last call (rank-independent fields), oldest first; the
        newest ``history`` of them when nobody pops."""
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
        """Leave (like ``torch.distributed.algorithms.Join``): this rank contributes zeros to every step until
        every rank has closed, and the others go on, with fewer than N - b when that is all there is. Returns
        on every rank together, with the final parameters and optimizer state; then frees the MPI resources.
        ``with`` calls it too; an exception leaving the ``with`` block is announced to the other ranks."""
        if self._hvdb_closed:
            return
        self._hvdb_closed = True
        engine = self._hvdb_engine
        try:
            if self._hvdb_buckets is not None:
                if self._hvdb_buckets.started:  # backward() without step(): some buckets have left and this
                    self.last_step = self._hand_in(None, None).reply  # rank may be in the step: complete it
                self._hvdb_buckets.remove()
            engine.stop()
            engine.free()
        finally:
            lifecycle.unregister(self)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None:
            lifecycle.announce(exc)
            return
        self.close()
