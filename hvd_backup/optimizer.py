"""``hvd_backup.DistributedOptimizer``: Horovod's optimizer wrapper, with backup workers.

    opt = hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                          named_parameters=model.named_parameters(), backup_workers=1)

The returned object is an instance of a subclass of the wrapped optimizer's class that shares its parameter
groups and state (as Horovod does), so schedulers, ``state_dict()`` and ``zero_grad()`` work unchanged.
``step()`` runs one global step of the protocol in :mod:`hvd_backup.protocol`.
"""

from __future__ import annotations

import atexit
import copy
import math
import numbers
import time
import weakref
from collections import OrderedDict, defaultdict

import torch
from mpi4py import MPI

from .backends import BACKENDS, make_backend
from .protocol import StepEngine, StepRecord

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
            N // 4) for the highest throughput, from the arrival records (:mod:`hvd_backup.adaptive`).
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


def _agree(comm: MPI.Intracomm, settings: dict) -> None:
    """Raise ``ValueError`` on every rank if any rank's ``settings`` differ from rank 0's."""
    everyone = comm.allgather(settings)
    for rank, theirs in enumerate(everyone):
        for key, value in theirs.items():
            if value != everyone[0][key]:
                raise ValueError(
                    f"hvd_backup: {key} differs across ranks: rank 0 has {everyone[0][key]!r}, "
                    f"rank {rank} has {value!r}"
                )


def _validate(size: int, b, straggler_timeout, min_workers, hang_timeout, max_lag, backend, auto_every,
              max_backup_workers) -> tuple[int, int | None, int]:
    """Check the settings (identical on all ranks by now); return (initial b, largest b or None, min_workers)."""

    def is_int(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def is_seconds(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    b_max = None
    if b == "auto":
        b_max = max(1, size // 4) if max_backup_workers is None else max_backup_workers
        if not is_int(b_max) or not 0 <= b_max < size:
            raise ValueError(f"hvd_backup: max_backup_workers={b_max!r} must be an integer with 0 <= it < N={size}")
        if not is_int(auto_every) or auto_every < 1:
            raise ValueError(f"hvd_backup: auto_every={auto_every!r} must be an integer >= 1")
        b = 0  # start synchronous; the first decision comes after auto_every steps of records
    elif not is_int(b) or not 0 <= b < size:
        raise ValueError(f"hvd_backup: backup_workers={b!r} must be an integer with 0 <= b < N={size}, or 'auto'")
    if straggler_timeout is not None and not is_seconds(straggler_timeout):
        raise ValueError(f"hvd_backup: straggler_timeout={straggler_timeout!r} must be None or seconds > 0")
    if not is_seconds(hang_timeout):
        raise ValueError(f"hvd_backup: hang_timeout={hang_timeout!r} must be seconds > 0")
    quorum = size - (b if b_max is None else b_max)
    if min_workers is None:
        min_workers = 1
    if not is_int(min_workers) or not 1 <= min_workers <= quorum:
        raise ValueError(
            f"hvd_backup: min_workers={min_workers!r} must be an integer with 1 <= min_workers <= N-b={quorum}"
        )
    if max_lag is not None and (not is_int(max_lag) or max_lag < 1):
        raise ValueError(f"hvd_backup: max_lag={max_lag!r} must be None or an integer >= 1")
    if backend not in BACKENDS:
        raise ValueError(f"hvd_backup: backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    return int(b), b_max, int(min_workers)


class _Hyper:
    """The numeric hyper-parameters of an optimizer's groups, as a flat list of floats and back."""

    def __init__(self, groups):
        self.fields = []  # (group index, key, tuple index or None)
        for gi, group in enumerate(groups):
            for key in sorted(k for k in group if k != "params"):
                value = group[key]
                if isinstance(value, tuple) and value and all(self._numeric(v) for v in value):
                    self.fields.extend((gi, key, i) for i in range(len(value)))
                elif self._numeric(value):
                    self.fields.append((gi, key, None))

    @staticmethod
    def _numeric(value) -> bool:
        if isinstance(value, torch.Tensor):
            return value.numel() == 1
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    def signature(self) -> str:
        return ";".join(f"{g}.{k}.{i}" for g, k, i in self.fields)

    def snapshot(self, groups) -> list[float]:
        out = []
        for gi, key, i in self.fields:
            value = groups[gi][key] if i is None else groups[gi][key][i]
            out.append(float(value))
        return out

    def apply(self, groups, values) -> None:
        for (gi, key, i), value in zip(self.fields, values):
            group = groups[gi]
            if i is not None:
                items = list(group[key])
                items[i] = type(items[i])(value)
                group[key] = tuple(items)
            elif isinstance(group[key], torch.Tensor):
                group[key].fill_(value)
            else:
                group[key] = type(group[key])(value)


def _copy_state(src_opt, dst_opt, pairs) -> None:
    """Make ``dst_opt``'s parameters and state equal to ``src_opt``'s; ``pairs`` maps src to dst params."""
    with torch.no_grad():
        for sp, dp in pairs:
            dp.copy_(sp)
            s_state = src_opt.state.get(sp)
            if not s_state:
                dst_opt.state.pop(dp, None)
                continue
            d_state = dst_opt.state[dp]
            for key, value in s_state.items():
                current = d_state.get(key)
                if torch.is_tensor(value):
                    if (torch.is_tensor(current) and current.shape == value.shape and current.dtype == value.dtype
                            and current.device == value.device):
                        current.copy_(value)
                    else:
                        d_state[key] = value.clone()
                else:
                    d_state[key] = copy.deepcopy(value)
            for key in [k for k in d_state if k not in s_state]:
                del d_state[key]
    for sg, dg in zip(src_opt.param_groups, dst_opt.param_groups):
        for key, value in sg.items():
            if key != "params":
                dg[key] = value.clone() if torch.is_tensor(value) else copy.deepcopy(value)


class _Consensus:
    """The tensors the protocol moves: flat gradient buffers, the live optimizer and the consensus copy."""

    def __init__(self, opt, base, names):
        self.opt, self.base = opt, base
        self.all_params = [p for g in opt.param_groups for p in g["params"]]
        self.params = [p for p in self.all_params if p.requires_grad]
        self.names = [names.get(p, f"param[{i}]") for i, p in enumerate(self.params)]
        if not self.params:
            raise ValueError("hvd_backup: the optimizer has no parameters that require gradients")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"hvd_backup: all parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        if len(devices) != 1:
            raise ValueError(f"hvd_backup: all parameters must be on one device, got {sorted(map(str, devices))}")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.numel = sum(p.numel() for p in self.params)
        # Last element: the count of included contributions, reduced with the gradients.
        self.send = torch.zeros(self.numel + 1, dtype=self.dtype, device=self.device)
        self.zeros = torch.zeros_like(self.send)
        self._send_views = self.views(self.send)
        self.hyper = _Hyper(opt.param_groups)
        self.shadow = None

    def views(self, flat):
        out, offset = [], 0
        for p in self.params:
            n = p.numel()
            out.append(flat[offset:offset + n].view_as(p))
            offset += n
        return out

    def signature(self) -> str:
        return f"{self.dtype}:" + ",".join("x".join(map(str, p.shape)) for p in self.params)

    def flatten(self) -> None:
        """Copy the local gradients into ``send`` (training thread)."""
        views, grads = [], []
        with torch.no_grad():
            for p, view, name in zip(self.params, self._send_views, self.names):
                if p.grad is None:
                    view.zero_()
                elif p.grad.is_sparse:
                    raise ValueError(f"hvd_backup: parameter {name} has a sparse gradient; only dense ones are supported")
                elif p.grad.data_ptr() != view.data_ptr():  # a gradient accumulated in place already is there
                    views.append(view)
                    grads.append(p.grad)
            if views:
                torch._foreach_copy_(views, grads)

    def _apply(self, opt, params, flat, hyper) -> None:
        # The gradients become views of the reduced buffer: no copy. (For the live parameters that buffer is
        # then the training thread's `send`, which this thread does not touch until the next submission.)
        for p, view in zip(params, self.views(flat)):
            p.grad = view
        self.hyper.apply(opt.param_groups, hyper)
        self.base.step(opt)

    def live_params(self):
        return self.all_params

    def consensus_params(self):
        return [p for g in self.shadow.param_groups for p in g["params"]]

    def apply_live(self, flat, hyper) -> None:
        if flat is not self.send:  # the result is in `zeros`: it becomes the training thread's buffer
            self.send, self.zeros = self.zeros, self.send
            self._send_views = self.views(self.send)
        self._apply(self.opt, self.params, flat, hyper)

    def apply_consensus(self, flat, hyper) -> None:
        shadow_params = [p for g in self.shadow.param_groups for p in g["params"] if p.requires_grad]
        self._apply(self.shadow, shadow_params, flat, hyper)

    def _shadow_pairs(self):
        return list(zip(self.all_params, (p for g in self.shadow.param_groups for p in g["params"])))

    def sync_consensus(self) -> None:
        """Consensus := live (the live parameters are at the current step)."""
        if self.shadow is None:
            self.shadow = self._make_shadow()
        else:
            _copy_state(self.opt, self.shadow, self._shadow_pairs())

    def restore_live(self) -> None:
        """Live := consensus (catch-up)."""
        _copy_state(self.shadow, self.opt, [(s, p) for p, s in self._shadow_pairs()])

    def _make_shadow(self):
        base = self.base
        clones = {p: p.detach().clone().requires_grad_(p.requires_grad) for p in self.all_params}
        shadow = base.__new__(base)
        shadow.__dict__.update({k: v for k, v in self.opt.__dict__.items() if not k.startswith("_hvdb_")})
        shadow.param_groups = [dict(g, params=[clones[p] for p in g["params"]]) for g in self.opt.param_groups]
        shadow.state = defaultdict(dict)
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
            if hasattr(shadow, name):
                setattr(shadow, name, OrderedDict())
        _copy_state(self.opt, shadow, list(clones.items()))
        return shadow


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
        consensus = _Consensus(self, base, names)
        _agree(comm, dict(
            backup_workers=backup_workers, straggler_timeout=straggler_timeout, min_workers=min_workers,
            hang_timeout=hang_timeout, max_lag=max_lag, backend=backend, optimizer=base.__name__,
            auto_every=auto_every, max_backup_workers=max_backup_workers,
            parameters=consensus.signature(), hyper_parameters=consensus.hyper.signature(),
        ))
        size = comm.Get_size()
        b, b_max, min_workers = _validate(size, backup_workers, straggler_timeout, min_workers, hang_timeout,
                                          max_lag, backend, auto_every, max_backup_workers)
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
            from .adaptive import AutoBackup

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
