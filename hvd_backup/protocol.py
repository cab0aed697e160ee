"""The backup-worker step protocol, run by one communication thread per rank.

Every global step ``t``, on every one of the N ranks, with quorum ``k = N - b``:

1. **Arrive.** When this rank's gradient for step ``t`` is ready (computed on the parameters of version ``t``),
   the communication thread arrives with ONE atomic fetch-and-add on step ``t``'s counter word
   (:class:`mpi_tools.ArrivalCounter`). An arrival that saw a value ``< k`` is included.
2. **Close.** The step closes when ``k`` ranks have arrived or, with ``straggler_timeout``, when the step's
   first arriver closes it that many seconds after its own arrival, once ``min_workers`` have arrived. The
   close is a fetch-and-add on the same word, so it is atomic with the arrivals and all ranks agree on who was
   in. A rank whose gradient is not ready learns that its step closed by polling the word.
3. **Contribute.** Every rank posts the step's nonblocking allreduce: included ranks their gradients and a count
   of 1 in the buffer's last element, all others zeros. A slow rank's thread posts its zeros while its training
   thread is still busy, so the others never wait for its gradient. A small float64 allreduce beside it carries
   per-rank arrival records and the first arriver's hyper-parameters (learning rate, momentum, ...).
4. **Reweight.** The reduced buffer holds the sum of the included gradients and their count; every rank divides
   by the count, takes the first arriver's hyper-parameters and applies the identical update: to the live
   parameters when its training thread is waiting for this step, else to a consensus copy. Parameters stay
   bit-identical on all ranks.
5. **Catch up.** A gradient computed on parameters older than the current step is dropped; the consensus copy
   (parameters and optimizer state) is copied into the live ones in one go, and the training thread computes
   its next gradient on current parameters. Memory is one consensus copy however far behind a rank is.
6. **Isolate.** Step ``t`` uses counter word ``t mod slots``. The counter's host resets word ``t - 1`` after step
   ``t``'s allreduce completed on it: every rank has then posted step ``t``, so nothing can still touch word
   ``t - 1``, and the reset is ordered before any arrival of step ``t - 1 + slots``.
7. **Never hang.** A watchdog fails a step that is not complete within ``hang_timeout`` with an error naming the
   step and the ranks that never contributed (from per-rank marks in the counter window), raises it in the
   training thread, and aborts the job if the process is still alive shortly after.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
from mpi4py import MPI

from mpi_tools import ArrivalCounter, Backoff, ClockSync

from .errors import HangError, ProtocolError

__all__ = ["HangError", "ProtocolError", "StepEngine", "StepRecord"]

# Arrival status codes in the metadata allreduce.
_ABSENT, _LATE, _IN = 0.0, 1.0, 2.0
# The metadata allreduce (float64): per-rank blocks of N values, then the first arriver's hyper-parameters.
_ARRIVAL, _STATUS, _COMPUTE, _LOSS, _STOP, _DURATION = range(6)
_BLOCKS = 6


@dataclass(frozen=True)
class StepRecord:
    """What happened in one global step, identical on every rank except ``status`` and ``wait_s``.

    ``status`` is this rank's part: ``"included"`` (its gradient counted), ``"dropped"`` (its gradient for this
    step was ready too late and the step was applied without it), ``"caught_up"`` (its gradient was computed on
    older parameters, was discarded, and its parameters were brought to this step's) or ``"absent"`` (its
    training thread handed in nothing while the step ran).
    """

    step: int
    size: int
    count: int
    included: tuple[int, ...]
    closed_by: str  # "all", "quorum" or "timeout"
    status: str
    wait_s: float
    arrival_s: tuple[float | None, ...]  # per rank, seconds after the step's first arrival; None: did not arrive
    compute_s: tuple[float | None, ...]  # per rank, compute time of the gradient it handed in during this step
    duration_s: float  # this rank: from the previous step's completion to this one's
    loss: tuple[float | None, ...] = ()  # per rank, the loss it reported with the gradient it handed in
    stop_requested: bool = False  # some rank asked the group to stop after this step (request_stop)
    seen_s: tuple[float | None, ...] = ()  # per rank that did not arrive: when it learned the step had closed
    staleness: int | None = None  # asynchronous SGD only: updates that landed between this one's read and write
    quorum: int = 0  # k = N - b in force for this step
    rank_step_s: tuple[float, ...] = ()  # per rank, the duration of its previous step (for choosing b)

    @property
    def mean_loss(self) -> float | None:
        """Mean loss over the included ranks that reported one."""
        values = [self.loss[r] for r in self.included if r < len(self.loss) and self.loss[r] is not None]
        return sum(values) / len(values) if values else None

    @property
    def dropped(self) -> tuple[int, ...]:
        """Ranks whose gradient is not in this step."""
        inside = set(self.included)
        return tuple(r for r in range(self.size) if r not in inside)


class Timings:
    """Seconds spent per phase of the protocol, summed, with counts (``opt.timings()`` shows them)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.total: dict[str, float] = collections.defaultdict(float)
        self.count: dict[str, int] = collections.defaultdict(int)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.total[phase] += seconds
            self.count[phase] += 1

    def snapshot(self, reset: bool = False) -> dict[str, tuple[float, int]]:
        with self._lock:
            out = {k: (self.total[k], self.count[k]) for k in self.total}
            if reset:
                self.total.clear()
                self.count.clear()
        return out


@dataclass(eq=False)
class _Submission:
    version: int
    hyper: list[float]
    compute_s: float
    submitted_at: float
    loss: float | None = None
    arrived: bool = False
    reply: StepRecord | None = None
    status: str = ""


@dataclass
class _StepState:
    t: int
    order: int | None = None  # this rank's arrival order, None if it did not arrive
    arrived_at: float = math.nan
    closed_seen_at: float = math.nan
    submission: _Submission | None = None


class StepEngine:
    """The communication thread of one rank (and its watchdog).

    ``model`` provides the tensors and updates (see :class:`hvd_backup.optimizer._Consensus`): ``send``
    (the training thread's flat gradient buffer, length P + 1), ``zeros`` (the same shape, owned by this
    thread), ``apply_live(result, hyper)``, ``apply_consensus(result, hyper, sync_from_live)`` and
    ``restore_live()``. The constructor is collective (counter window, clock sync).
    """

    def __init__(
        self,
        model,
        *,
        backend,
        quorum: int,
        straggler_timeout: float | None,
        min_workers: int,
        hang_timeout: float,
        max_lag: int | None,
        hyper_len: int,
        slots: int = 4,
        poll_cap: float | None = None,
        abort_grace: float = 5.0,
        history: int = 100_000,
    ):
        self.model = model
        self.backend = backend
        comm = backend.comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.quorum = quorum
        self.straggler_timeout = straggler_timeout
        self.min_workers = min_workers
        self.hang_timeout = hang_timeout
        self.max_lag = max_lag
        self.hyper_len = hyper_len
        # Waiting ranks poll the counter's host: at most every 0.5 ms, less often on large jobs so that the host
        # serves about 500k polls per second at the most, whatever N.
        self.poll_cap = poll_cap if poll_cap is not None else max(5e-4, 2e-6 * self.size)
        self.abort_grace = abort_grace
        self.clock = ClockSync(comm=comm)
        self.counter = ArrivalCounter(slots, comm=comm, root=0)
        n = self.size
        self._meta = torch.zeros(_BLOCKS * n + hyper_len, dtype=torch.float64)
        self.snapshot_every: int | None = None
        self._snapshots: dict[int, list[torch.Tensor]] = {}
        self.stop_requested = False
        self._stop_wanted = False
        self.records: collections.deque[StepRecord] = collections.deque(maxlen=history)  # users pop these
        self._last_record: StepRecord | None = None  # the latest applied step's (a catch-up's answer)
        self.auto = None  # an AutoBackup when backup_workers="auto"
        self._stale_compute: float | None = None
        self._last_duration = 0.0
        self.timings = Timings()

        self._cond = threading.Condition()
        self._pending: _Submission | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._rebase_to: int | None = None
        self._submitted = False
        self._finished = threading.Event()
        self.step = 0  # next global step the thread works on
        self.version = 0  # the step the live parameters belong to
        self.consensus_version = -1  # the step the consensus copy belongs to (-1: none yet)
        self._current: _StepState | None = None
        self._busy_since: float | None = None  # when this rank began its part of the current step (watchdog)
        self._last_done = time.monotonic()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._beat_every = min(1.0, hang_timeout / 4)
        self._last_beat = 0.0
        # The watchdog asks, the communication thread reads the counter window: all one-sided operations stay on
        # one thread (Open MPI's UCX one-sided component is not safe with two threads operating at once).
        self._diagnose = threading.Event()
        self._diagnosed = threading.Event()
        self._diagnosis = None

    # --- training-thread side ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the communication thread and the watchdog (the rank takes part in steps from now on)."""
        # Hand-offs between the training and communication threads wait for the GIL; Python's default 5 ms
        # switch interval would add up to that to every step while the training thread runs Python code.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._last_done = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="hvd_backup-comm", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="hvd_backup-watchdog", daemon=True)
        self._thread.start()
        self._watchdog.start()

    def submit(self, hyper: list[float], compute_s: float, loss: float | None = None) -> StepRecord:
        """Hand in the gradient now in ``model.send`` (computed on version ``self.version``); block until this
        rank's parameters are updated; return the step's record. Raises the thread's error, if any."""
        sub = _Submission(self.version, hyper, compute_s, time.monotonic(), loss)
        with self._cond:
            self._raise_if_failed()
            self._submitted = True
            self._pending = sub
            self._cond.notify_all()
            while sub.reply is None:
                self._raise_if_failed()
                self._cond.wait(0.5)
        return sub.reply

    def request_stop(self) -> None:
        """Ask every rank to stop after the next step this rank takes part in (safe in a signal handler)."""
        self._stop_wanted = True

    def take_snapshot(self, step: int) -> list[torch.Tensor] | None:
        """The parameters as they were at global step ``step`` (a multiple of ``snapshot_every``), once."""
        with self._cond:
            return self._snapshots.pop(step, None)

    def rebase(self, step: int) -> None:
        """Start counting global steps at ``step`` (a restored checkpoint's); only before the first submit."""
        with self._cond:
            if self._submitted:
                raise RuntimeError("hvd_backup: the global step can only be restored before the first step()")
            self._rebase_to = int(step)
            self._cond.notify_all()
            while self._rebase_to is not None:
                self._raise_if_failed()
                self._cond.wait(0.5)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop together with the other ranks (all must call it after their last step); joins the threads."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            while not self._finished.is_set():
                self._raise_if_failed()
                self._cond.wait(0.5)
        self._thread.join()
        self._raise_if_failed()

    def free(self) -> None:
        """Release the counter window (collective); call after :meth:`stop` on every rank."""
        self.counter.free()
        if hasattr(self.backend, "free"):
            self.backend.free()

    # --- the communication thread --------------------------------------------------------------------------

    def _run(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)
        try:
            while True:
                st = _StepState(self.step)
                self._current = st
                outcome = self._await_turn(st)
                if outcome == "stopped":
                    break  # every rank stopped
                if outcome == "rebased":
                    continue
                self._contribute_and_apply(st)
                self._busy_since = None
                if self.rank == self.counter.root and st.t > 0:
                    self.counter.reset(st.t - 1)
                self.step = st.t + 1
        except BaseException as exc:  # noqa: BLE001 - the training thread re-raises it
            self._fail(exc)
        finally:
            self._current = None
            self._finished.set()
            with self._cond:
                self._cond.notify_all()

    def _take(self) -> _Submission | None:
        with self._cond:
            sub = self._pending
            return sub if sub is not None and sub.reply is None and not sub.arrived else None

    def _await_turn(self, st: _StepState) -> str:
        """Steps 1-2: arrive with our gradient (``"arrived"``), or learn that the step closed without it
        (``"closed"``); ``"stopped"`` once every rank stopped, ``"rebased"`` after :meth:`rebase`."""
        k, t = self.quorum, st.t
        backoff = Backoff(20e-6, self.poll_cap)
        stopped_here = False
        while True:
            with self._cond:
                if self._rebase_to is not None:
                    if self._last_record is not None:
                        raise ProtocolError(f"rank {self.rank}: the global step was restored after step "
                                            f"{self._last_record.step} ran: other ranks started training first")
                    self.step = self.version = self._rebase_to
                    self._rebase_to = None
                    self._cond.notify_all()
                    return "rebased"
            sub = self._take()
            if sub is not None and sub.version < t:
                self._catch_up(sub)
                continue
            if sub is not None:
                sub.arrived = True
                st.submission = sub
                self._busy_since = time.monotonic()
                tic = time.perf_counter()
                st.order = self.counter.arrive(t)
                st.arrived_at = self.clock.now()
                self.timings.add("arrive", time.perf_counter() - tic)
                return "arrived"
            if self._stopping and not stopped_here:
                self._busy_since = time.monotonic()
                self.counter.stop(t)
                stopped_here = True
            word = ArrivalCounter.decode(self.counter.peek(t))
            if word.arrivals >= k or word.closes:
                st.closed_seen_at = self.clock.now()
                return "closed"
            if word.stops == self.size:
                return "stopped"
            self._tend()
            with self._cond:
                if self._rebase_to is None and (
                        self._pending is None or self._pending.arrived or self._pending.reply is not None):
                    self._cond.wait(backoff.interval())

    def _contribute_and_apply(self, st: _StepState) -> None:
        """Steps 3-5 for one step."""
        buf, included = self._contribute(st)
        tic = time.perf_counter()
        record, hyper = self._reweight(st, buf)
        self.timings.add("reduce", time.perf_counter() - tic)
        tic = time.perf_counter()
        self._apply(st, buf, hyper, record, included)
        self.timings.add("apply", time.perf_counter() - tic)

    def _contribute(self, st: _StepState):
        """Step 3: post the step's allreduces (our gradients and a count of 1, or zeros) and wait for them."""
        model, n, me = self.model, self.size, self.rank
        included = st.order is not None and st.order < self.quorum
        if included:
            buf = model.send
            buf[-1] = 1.0
        else:
            buf = model.zeros
            buf.zero_()
        meta = self._meta
        meta.zero_()
        sub = st.submission
        if sub is not None:
            meta[_ARRIVAL * n + me] = st.arrived_at
            meta[_STATUS * n + me] = _IN if included else _LATE
            meta[_COMPUTE * n + me] = sub.compute_s
            meta[_LOSS * n + me] = math.nan if sub.loss is None else sub.loss
            if st.order == 0:
                meta[_BLOCKS * n:] = torch.tensor(sub.hyper, dtype=torch.float64)
        else:
            meta[_ARRIVAL * n + me] = st.closed_seen_at  # when this rank learned the step had closed
            if self._stale_compute is not None:  # the compute time of a gradient that came too late to count
                meta[_COMPUTE * n + me] = self._stale_compute
        self._stale_compute = None
        meta[_DURATION * n + me] = self._last_duration
        if self._stop_wanted:
            meta[_STOP * n + me] = 1.0
        if self._busy_since is None:
            self._busy_since = time.monotonic()
        self.counter.mark(st.t)
        handles = [self.backend.start(buf, "hvd_backup.grad"), self.backend.start(meta, "hvd_backup.meta")]
        tic = time.perf_counter()
        self._wait_reduced(st, handles)
        self.timings.add("allreduce", time.perf_counter() - tic)
        return buf, included

    def _reweight(self, st: _StepState, buf):
        """Step 4, first half: the mean of the included gradients, and the step's record."""
        n, t = self.size, st.t
        count = int(round(float(buf[-1])))
        block = self._meta[: _BLOCKS * n].view(_BLOCKS, n).tolist()
        status = block[_STATUS]
        ins = tuple(r for r in range(n) if status[r] == _IN)
        if count != len(ins) or count < 1:
            raise ProtocolError(f"step {t}: reduced count {count} but ranks {list(ins)} say they were included")
        buf[:-1].div_(count)  # reweight: the mean over the gradients that were in, not over N
        hyper = self._meta[_BLOCKS * n:].tolist()
        arrived = [status[r] >= _LATE for r in range(n)]
        times = block[_ARRIVAL]
        first = min((times[r] for r in range(n) if arrived[r]), default=0.0)
        now = time.monotonic()
        record = StepRecord(
            step=t, size=n, count=count, included=ins,
            closed_by="all" if count == n else "quorum" if count == self.quorum else "timeout",
            status="absent", wait_s=0.0,
            arrival_s=tuple(times[r] - first if arrived[r] else None for r in range(n)),
            compute_s=tuple(block[_COMPUTE][r] if block[_COMPUTE][r] > 0 else None for r in range(n)),
            duration_s=now - self._last_done,
            loss=tuple(block[_LOSS][r] if arrived[r] and math.isfinite(block[_LOSS][r]) else None
                       for r in range(n)),
            stop_requested=any(block[_STOP]),
            seen_s=tuple(None if arrived[r] else times[r] - first for r in range(n)),
            quorum=self.quorum,
            rank_step_s=tuple(block[_DURATION]),
        )
        self._last_duration = now - self._last_done
        self._last_done = now
        return record, hyper

    def _apply(self, st: _StepState, buf, hyper, record: StepRecord, included: bool) -> None:
        """Step 4, second half, and 5: the identical update, on the live parameters if the training thread waits
        for this step, else on the consensus copy; then answer a waiting training thread."""
        model, t = self.model, st.t
        with self._cond:
            pending = self._pending if self._pending is not None and self._pending.reply is None else None
        if pending is not None and pending.version == t:
            model.apply_live(buf, hyper)
            self.version = t + 1
            self._snapshot(t + 1, model.live_params())
        else:
            if self.consensus_version != t:
                if self.version != t:
                    raise ProtocolError(f"step {t}: neither live ({self.version}) nor consensus "
                                        f"({self.consensus_version}) parameters are at this step")
                model.sync_consensus()
            model.apply_consensus(buf, hyper)
            self.consensus_version = t + 1
            self._snapshot(t + 1, model.consensus_params())
            if self.max_lag is not None and t + 1 - self.version > self.max_lag:
                raise ProtocolError(
                    f"rank {self.rank}: its training thread is {t + 1 - self.version} steps behind at step {t}, "
                    f"more than max_lag={self.max_lag}"
                )
        if record.stop_requested:
            self.stop_requested = True
        self._last_record = record
        self.records.append(record)
        if self.auto is not None:
            b = self.auto.observe(record)
            if b is not None:
                self.quorum = self.size - b
        if pending is not None and pending.version == t:
            self._reply(pending, record, "included" if included else "dropped")
        elif pending is not None:  # a stale gradient handed in while the step ran
            self._catch_up(pending)

    def _snapshot(self, version: int, params) -> None:
        every = self.snapshot_every
        if every and version % every == 0:
            copy = [p.detach().clone() for p in params]
            with self._cond:
                self._snapshots[version] = copy

    def _wait_reduced(self, st: _StepState, handles) -> None:
        """Wait for the step's allreduces; the first arriver closes the step on ``straggler_timeout``."""
        backoff = Backoff(20e-6, self.poll_cap)
        closer = st.order == 0 and self.straggler_timeout is not None
        close_at = time.monotonic() + (self.straggler_timeout or 0.0)
        while not all(self.backend.done(h) for h in handles):
            if closer and time.monotonic() >= close_at:
                word = ArrivalCounter.decode(self.counter.peek(st.t))
                if word.arrivals >= self.quorum or word.closes:
                    closer = False
                elif word.arrivals >= self.min_workers:
                    self.counter.close(st.t)
                    closer = False
            self._tend()
            backoff.sleep()
        for h in handles:
            self.backend.finish(h)

    def _catch_up(self, sub: _Submission) -> None:
        """Step 5: drop a gradient computed on old parameters; copy the consensus into the live state."""
        if self.consensus_version <= sub.version:
            raise ProtocolError(f"rank {self.rank}: catch-up from step {sub.version} but the consensus is at "
                                f"{self.consensus_version}")
        tic = time.perf_counter()
        self.model.restore_live()
        self.timings.add("catch_up", time.perf_counter() - tic)
        self._stale_compute = sub.compute_s
        self.version = self.consensus_version
        last = self._last_record  # the step the consensus now holds (not self.records: the user pops those)
        if last is None:
            raise ProtocolError(f"catch-up at step {self.step} before any step completed")
        self._reply(sub, last, "caught_up")

    def _reply(self, sub: _Submission, record: StepRecord, status: str) -> None:
        wait = time.monotonic() - sub.submitted_at
        reply = dataclasses.replace(record, status=status, wait_s=wait)
        with self._cond:
            sub.reply = reply
            if self._pending is sub:
                self._pending = None
            self._cond.notify_all()

    # --- failure handling -------------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()
        print(f"hvd_backup: rank {self.rank}: {exc}", file=sys.stderr, flush=True)
        exc.reported = True  # printed once, here

    def _tend(self) -> None:
        """The communication thread's chores between polls: MPI progress (the counter's host serves the others'
        one-sided operations), this rank's heartbeat, and reading the counter when the watchdog asks."""
        self.counter.progress()
        now = time.monotonic()
        if now - self._last_beat >= self._beat_every:
            self._last_beat = now
            self.counter.beat(int(1e3 * self.clock.now()))
        if self._diagnose.is_set() and not self._diagnosed.is_set():
            self._diagnosis = self.counter.read_marks(timeout=min(10.0, self.hang_timeout))
            self._diagnosed.set()

    def _watch(self) -> None:
        """Fail a step that outlives ``hang_timeout``; abort the job if the process lingers after a failure."""
        while not self._finished.is_set():
            st, since = self._current, self._busy_since
            if self._error is not None:
                break
            if st is not None and since is not None and time.monotonic() - since > self.hang_timeout:
                self._diagnose.set()
                self._diagnosed.wait(min(15.0, self.hang_timeout + 5))
                self._fail(self._hang_error(st))
                break
            self._finished.wait(min(1.0, self._beat_every))
        if self._error is not None:
            # The training thread raises the error; if the process is still here (a rank stuck in MPI, an
            # interpreter waiting on it at exit), take the whole job down rather than hang.
            time.sleep(self.abort_grace)
            print(f"hvd_backup: rank {self.rank}: aborting the job after: {self._error}", file=sys.stderr,
                  flush=True)
            MPI.COMM_WORLD.Abort(1)
            os._exit(1)

    def _hang_error(self, st: _StepState) -> HangError:
        """Name the ranks that never posted this step, or that posted it and then went silent (killed, frozen)."""
        if not self._diagnosed.is_set():
            return HangError(f"step {st.t}: did not complete within hang_timeout={self.hang_timeout:g}s, and this "
                             f"rank's communication thread is blocked inside MPI (the counter host rank "
                             f"{self.counter.root} may be stuck or gone)")
        found = self._diagnosis
        if found is None:
            return HangError(f"step {st.t}: the counter host rank {self.counter.root} did not answer (it is stuck "
                             f"or gone) and the step did not complete within hang_timeout={self.hang_timeout:g}s")
        marks, beats = found
        now_ms = 1e3 * self.clock.now()
        silent_for = {r: (now_ms - b) / 1e3 for r, b in enumerate(beats)
                      if r != self.rank and now_ms - b > 2e3 * self._beat_every + 1e3}
        culprits = sorted({r for r, m in enumerate(marks) if m < st.t} | set(silent_for))
        detail = ""
        if silent_for:
            quiet = ", ".join(f"rank {r} for {s:.0f}s" for r, s in sorted(silent_for.items()))
            detail = f" (no heartbeat from {quiet})"
        return HangError(f"step {st.t}: ranks {culprits} did not contribute within "
                         f"hang_timeout={self.hang_timeout:g}s{detail}")
