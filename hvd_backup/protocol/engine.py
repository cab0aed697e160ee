"""The step engine: one communication thread per rank that runs the protocol's steps (see
:mod:`hvd_backup.protocol`) one global step after another, and its hand-off with the training thread."""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import threading
import time

import torch
from mpi4py import MPI

from mpi_tools import ArrivalCounter, ClockSync

from ..errors import RankFailedError, report
from ..lifecycle import advise_keepalives
from ..records import Status, StepRecord, Timings
from .apply import apply, catch_up
from .arrive import await_turn
from .contribute import contribute
from .detach import Membership, wait_detached
from .interface import Backend, TensorSide
from .notice import CloseNotices
from .reweight import reweight
from .state import Meta, StepState, Submission, Turn
from .watchdog import Watchdog

__all__ = ["StepEngine"]


class StepEngine:
    """The communication thread of one rank (and its watchdog).

    ``side`` holds the tensors and applies updates (:class:`~hvd_backup.protocol.interface.TensorSide`),
    ``backend`` reduces them (:class:`~hvd_backup.protocol.interface.Backend`). The constructor is collective
    over ``backend.comm`` (counter window, clock sync).
    """

    def __init__(
        self,
        side: TensorSide,
        *,
        backend: Backend,
        quorum: int,
        straggler_timeout: float | None,
        min_workers: int,
        hang_timeout: float,
        max_lag: int | None,
        hyper_len: int,
        detach_after: int | None = None,
        startup_timeout: float | None = None,
        name: str = "hvd_backup",
        op: str = "average",
        predivide: float = 1.0,
        slots: int = 4,
        poll_cap: float | None = None,
        abort_grace: float = 5.0,
        history: int = 1024,
        buckets: list[tuple[int, int]] | None = None,
    ):
        self.side = side
        self.backend = backend
        comm = backend.comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.quorum = quorum
        self.straggler_timeout = straggler_timeout
        self.min_workers = min_workers
        self.hang_timeout = hang_timeout
        self.startup_timeout = startup_timeout if startup_timeout is not None else hang_timeout
        self.max_lag = max_lag
        self.name, self.op, self.predivide = name, op, predivide
        # Element ranges of `side.send`, each reduced by its own allreduce, posted in this order on every rank.
        self.buckets = list(buckets) if buckets else [(0, side.numel)]
        self.bucket_names = ([f"{name}.grad"] if len(self.buckets) == 1
                             else [f"{name}.grad.{j}" for j in range(len(self.buckets))])
        # The first step after a start waits for every rank (no backup workers, no timeout close): until every
        # rank has handed in once, some may still be setting their parameters (a broadcast after wrapping).
        self.warm = False
        # Waiting ranks poll the counter's host: at most every 0.5 ms, less often on large jobs so that the host
        # serves about 500k polls per second at the most, whatever N.
        self.poll_cap = poll_cap if poll_cap is not None else max(5e-4, 2e-6 * self.size)
        self.clock = ClockSync(comm=comm)
        # Each rank's host, so that a hang error can say where the missing ranks run (a lost node, a partition).
        self.hosts: list[str] = comm.allgather(MPI.Get_processor_name())
        if self.rank == 0:
            advise_keepalives(self.hosts)
        self.counter = ArrivalCounter(slots, comm=comm, root=0)
        # Created on every rank (collective), sent and read only where not turned off: a rank that sends none
        # still drains what others send it.
        self.notices = CloseNotices(comm, enabled=os.environ.get("HVD_BACKUP_CLOSE_NOTICES", "1") != "0")
        self.layout = Meta(self.size, hyper_len, len(side.present))
        self._meta = torch.zeros(self.layout.length, dtype=torch.float64)
        # The metadata travels at the end of the last bucket's allreduce where it can (float32 gradients, summed
        # as sent): across hosts a second operation after the last bucket cost up to a tenth of a step.
        self.fold_at: int | None = None
        if side.send.dtype == torch.float32 and backend.exact:
            side.reserve(self.layout.folded_length)
            self.fold_at = side.numel
            self.buckets[-1] = (self.buckets[-1][0], side.numel + self.layout.folded_length)
        # Which ranks take part in the steps (None: all, always; see .detach).
        self.members = Membership(self, detach_after) if detach_after is not None else None
        self.snapshot_every: int | None = None
        self._snapshots: dict[int, list[torch.Tensor]] = {}
        self.stop_requested = False
        self._stop_wanted = False
        self.records: collections.deque[StepRecord] = collections.deque(maxlen=history)  # users pop these
        self._covered: list[bool] = []  # steps applied since the last reply to the training thread (skipped?)
        self._last_record: StepRecord | None = None  # the latest applied step's (a catch-up's answer)
        self.auto = None  # an AutoBackup when backup_workers="auto"
        self._stale_compute: float | None = None
        self._last_duration = 0.0
        self.timings = Timings()

        self._cond = threading.Condition()
        self._pending: Submission | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._rebase_to: int | None = None
        self._submitted = False
        self._finished = threading.Event()
        self.step = 0  # next global step the thread works on
        self.version = 0  # the step the live parameters belong to
        self.consensus_version = -1  # the step the consensus copy belongs to (-1: none yet)
        self._current: StepState | None = None
        self._busy_since: float | None = None  # when this rank began its part of the current step (watchdog)
        self._last_done = time.monotonic()
        self._thread: threading.Thread | None = None
        self._beat_every = min(1.0, hang_timeout / 4)
        self._last_beat = 0.0
        # Each look is a synchronous one-sided read at the counter's host: over a busy link it waits behind the
        # step's own allreduce traffic (every 0.1 s cost 6M parameters over 1 Gbit/s a tenth of their step), so
        # there is none in the first second of waiting for the allreduces, when a step normally completes, unless
        # the last was 1.5 s ago (steps of under a second follow each other: the check must not starve).
        self._failure_check_every = 0.5
        self._quiet_until = 0.0  # no failure checks before then: the first second of waiting for a step's allreduces
        self._last_failure_check = 0.0
        self._to_announce: str | None = None  # this rank's failure, for the communication thread to publish
        self._announced = threading.Event()
        self.watchdog = Watchdog(self, abort_grace=abort_grace)

    # --- training-thread side ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the communication thread and the watchdog (the rank takes part in steps from now on)."""
        # Hand-offs between the training and communication threads wait for the GIL; Python's default 5 ms
        # switch interval would add up to that to every step while the training thread runs Python code.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._last_done = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="hvd_backup-comm", daemon=True)
        self._thread.start()
        self.watchdog.start()

    def notify_if_completed(self, t: int, before: int, added: int) -> None:
        """If this rank's operation on step ``t``'s word (which read ``before`` and added ``added``) took it
        from open to complete, tell the attached ranks that may still be waiting for it (:mod:`.notice`)."""
        n, k = self.attached_count(), self.step_quorum()
        before, after = ArrivalCounter.decode(before), ArrivalCounter.decode(before + added)
        if not before.complete(k, n) and after.complete(k, n) and after.arrivals + after.stops < n:
            self.notices.send(t, self.members.ranks() if self.members is not None else range(self.size))

    def attached_count(self) -> int:
        """How many ranks take part in the steps (all but the detached ones)."""
        return self.size if self.members is None else self.members.count()

    def step_quorum(self) -> int:
        """k for the step being decided: N - b, or N for the first step after a start."""
        return self.quorum if self.warm else self.size

    def bucket_ready(self, j: int) -> None:
        """Training thread, during the backward pass: bucket ``j`` of ``side.send`` holds this rank's gradient
        (computed on version ``self.version``). The first ready bucket hands the gradient in: the rank arrives."""
        with self._cond:
            sub = self._pending
            if sub is None or sub.reply is not None:
                sub = Submission(self.version, [], 0.0, time.monotonic(), sealed=False,
                                 ready=[False] * len(self.buckets))
                self._submitted = True
                self._pending = sub
            sub.ready[j] = True
            self._cond.notify_all()

    def submit(self, hyper: list[float], compute_s: float, loss: float | None = None,
               amp: bool = False, unscale: float = 1.0) -> Submission:
        """Hand in the gradient now in ``side.send`` (computed on version ``self.version``), or seal the one
        handed in bucket by bucket; block until this rank's parameters are updated; return the hand-in with its
        ``reply`` (the step's record) and the steps it ``covered``. Raises the thread's error, if any."""
        with self._cond:
            self._raise_if_failed()
            sub = self._pending
            if sub is not None and sub.reply is None and not sub.sealed:
                sub.hyper, sub.compute_s, sub.loss, sub.amp, sub.unscale = hyper, compute_s, loss, amp, unscale
                sub.submitted_at = time.monotonic()
                sub.sealed = True
            else:
                sub = Submission(self.version, hyper, compute_s, time.monotonic(), loss, amp, unscale)
                self._pending = sub
            self._submitted = True
            self._cond.notify_all()
            while sub.reply is None:
                self._raise_if_failed()
                self._cond.wait(0.5)
        return sub

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
        """Leave: from now on this rank contributes zeros to every step, until every rank has left; then its
        parameters and optimizer state become the final ones. Joins the threads. Blocks while other ranks
        are alive and still training (however long), not while one is silent (``HangError``)."""
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
        if self.consensus_version > self.version:  # steps ran after this rank's last one: take them
            self.side.restore_live()
            self.version = self.consensus_version

    def announce_failure(self, message: str, wait: float = 2.0) -> None:
        """Tell the other ranks that this rank failed (they raise ``RankFailedError`` within about a second).
        Safe from any thread; the one-sided operation runs on the communication thread while it is alive."""
        if self._announced.is_set() or self._to_announce is not None:
            return
        if self._thread is not None and self._thread.is_alive():
            self._to_announce = message
            self._announced.wait(wait)
        else:
            try:
                self.counter.fail(message)
            finally:
                self._announced.set()

    def free(self) -> None:
        """Release the counter window and the backend (collective); call after :meth:`stop` on every rank."""
        self.counter.free()
        if self.members is not None:
            self.members.free()
        self.notices.free()
        self.backend.free()

    # --- the communication thread --------------------------------------------------------------------------

    def _run(self) -> None:
        if self.side.device.type == "cuda":
            torch.cuda.set_device(self.side.device)
        try:
            while True:
                st = StepState(self.step)
                self._current = st
                if self.members is not None:
                    self.members.begin(st.t)
                    if not self.members.attached[self.rank]:
                        wait_detached(self, st)  # until attached again, at a later step
                        continue
                    self.backend.use(self.members.ranks())
                turn = await_turn(self, st)  # steps 1-2
                if turn is Turn.STOPPED:
                    break  # every rank stopped
                if turn is Turn.REBASED:
                    continue
                buf = contribute(self, st)  # step 3
                tic = time.perf_counter()
                if self.fold_at is not None:
                    self.layout.unfold(buf[self.fold_at:], self._meta)
                    buf = buf[:self.fold_at]
                record, hyper, present = reweight(self, st, buf)  # step 4
                if self.members is not None:
                    block = self._meta[: Meta.BLOCKS * self.size].view(Meta.BLOCKS, self.size).tolist()
                    self.members.observe(st, block, record)
                self.timings.add("reduce", time.perf_counter() - tic)
                tic = time.perf_counter()
                apply(self, st, buf, hyper, present, record)  # steps 4-5
                if self.members is not None:
                    self.members.after_apply(st.t)
                self.timings.add("apply", time.perf_counter() - tic)
                self.notices.drain(st.t + 1)
                self.warm = True
                self._busy_since = None
                if self.rank == self.counter.root and st.t > 0:
                    self.counter.reset(st.t - 1)  # step 6
                self.step = st.t + 1
            if self.members is not None:
                self.members.drain(self.hang_timeout)
        except BaseException as exc:  # noqa: BLE001 - the training thread re-raises it
            self.fail(exc)
            if self._to_announce is not None and not self._announced.is_set():
                self._publish_failure()
        finally:
            self._current = None
            self._finished.set()
            with self._cond:
                self._cond.notify_all()

    def _late_hand_in(self, t: int) -> Submission | None:
        """A hand-in that arrived too late for its step and was sealed after that step was applied."""
        with self._cond:
            sub = self._pending
            ok = sub is not None and sub.reply is None and sub.arrived and sub.sealed and sub.version < t
            return sub if ok else None

    def _take(self) -> Submission | None:
        with self._cond:
            sub = self._pending
            return sub if sub is not None and sub.reply is None and not sub.arrived else None

    def catch_up(self, sub: Submission) -> None:
        catch_up(self, sub)

    def reply(self, sub: Submission, record: StepRecord, status: Status) -> None:
        """Answer the training thread waiting in :meth:`submit`."""
        wait = time.monotonic() - sub.submitted_at
        reply = dataclasses.replace(record, status=status, wait_s=wait)
        with self._cond:
            sub.covered, self._covered = self._covered, []
            sub.reply = reply
            if self._pending is sub:
                self._pending = None
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """Record the thread's error (the training thread raises it) and print it once."""
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()
        report(exc, self.rank)

    def tend(self) -> None:
        """The communication thread's chores between polls: MPI progress unless the backend drives it (the
        counter's host serves the others' one-sided operations), this rank's heartbeat, publishing this rank's
        failure, noticing another's (raises ``RankFailedError``), and reading the counter when the watchdog
        asks."""
        if not self.backend.drives_progress:
            self.counter.progress()
        if self.members is not None:
            self.members.serve()
        now = time.monotonic()
        if now - self._last_beat >= self._beat_every:
            self._last_beat = now
            self.counter.beat(int(1e3 * self.clock.now()))
        if self._to_announce is not None and not self._announced.is_set():
            self._publish_failure()
        since = now - self._last_failure_check
        if since >= self._failure_check_every and (now >= self._quiet_until or since >= 3 * self._failure_check_every):
            self._last_failure_check = now
            found = self.counter.failed()
            if found is not None and found[0] != self.rank:
                rank, cause = found
                raise RankFailedError(f"rank {rank} failed: {cause}" if cause else f"rank {rank} failed",
                                      rank=rank, cause=cause)
        self.watchdog.serve()

    def _publish_failure(self) -> None:
        try:
            self.counter.fail(self._to_announce)
        finally:
            self._announced.set()
