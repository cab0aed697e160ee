"""The arrival counter: per-step MPI one-sided counters that decide who is in a step.

One window, hosted on ``root``, holds a ring of ``slots`` 64-bit counter words; per rank a progress mark (the
last step it contributed to) and a heartbeat (milliseconds on a clock the caller chooses); and a failure word
with, per rank, room for a one-line message (:meth:`fail`, :meth:`failed`).
Step ``t`` uses word ``t % slots``. A word's value packs three counts::

    value = arrivals + CLOSE * closes + STOP * stops

and every operation on it is a single atomic ``MPI_Fetch_and_op``, so the order in which ranks reach a word
*is* the order of the step:

* ``arrive(t)`` adds 1 and returns the value before it. With a quorum of ``k``, the arrival is included
  exactly when that value, decoded, shows fewer than ``k`` arrivals and no close.
* ``close(t)`` adds ``CLOSE``: every later arrival sees the close and is excluded, so a timeout close is atomic
  with the arrivals and every rank agrees on who was in.
* ``stop(t)`` adds ``STOP``: a rank that has left its training loop says so at every step from then on, so a step
  is complete once every rank either arrived or left, and all ranks stop at the first step that every rank left.

A word is reset to zero by ``reset(t)`` before its reuse ``slots`` steps later; the caller must only reset a
word once no rank can still touch it (the optimizer resets ``t - 1`` after step ``t``'s allreduce completed on
the resetting rank, which needs ``slots >= 3``).

The rank hosting the window must keep making MPI progress when one-sided operations are not done in shared
memory (e.g. ``osc ucx`` over TCP): call :meth:`progress` from wait loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from .deadline import Backoff, Deadline

__all__ = ["ArrivalCounter", "WindowError", "WordState"]

_INT64 = MPI.INT64_T


class WindowError(ValueError):
    """This MPI cannot do one-sided communication between these ranks (a launch setting, with advice)."""


@dataclass(frozen=True)
class WordState:
    """A decoded counter word."""

    arrivals: int
    closes: int
    stops: int

    def admits(self, quorum: int) -> bool:
        """Whether an arrival that saw this value is included: one of the first ``quorum``, and no close."""
        return self.arrivals < quorum and self.closes == 0

    def complete(self, quorum: int, size: int) -> bool:
        """Whether the step takes no more arrivals: ``quorum`` arrived, it was closed, or every rank that has not
        left arrived (and at least one did)."""
        return (self.arrivals >= quorum or self.closes > 0
                or (self.arrivals > 0 and self.arrivals + self.stops >= size))

    def everyone_left(self, size: int) -> bool:
        """Whether every rank left (stopped) at this step without any arriving."""
        return self.arrivals == 0 and self.stops >= size


_MESSAGE_WORDS = 32  # 256 bytes of message per rank


class ArrivalCounter:
    """Per-step arrival counters and per-rank progress records in one RMA window.

    The constructor is collective over ``comm`` (it duplicates the communicator and allocates the window);
    :meth:`free` is collective too. All other methods are one-sided and may be called by any single rank, from
    any one thread at a time.
    """

    CLOSE = 1 << 20
    STOP = 1 << 40

    def __init__(self, slots: int = 4, *, comm: MPI.Intracomm, root: int = 0):
        size = comm.Get_size()
        if slots < 3:
            raise ValueError(f"ArrivalCounter needs slots >= 3 so a word is never reset while in use, got {slots}")
        if size >= self.CLOSE:
            raise ValueError(f"ArrivalCounter supports fewer than {self.CLOSE} ranks, got {size}")
        if not 0 <= root < size:
            raise ValueError(f"root={root} is not a rank of a communicator of size {size}")
        self.slots = int(slots)
        self.root = int(root)
        self.size = size
        self._comm = comm.Dup()
        self.rank = self._comm.Get_rank()
        self._failed_at = self.slots + 2 * size  # the failure word: 0, or 1 + the first failed rank
        self._messages_at = self._failed_at + 1
        words = self._messages_at + _MESSAGE_WORDS * size
        itemsize = _INT64.Get_size()
        try:
            self._win = MPI.Win.Allocate(words * itemsize if self.rank == root else 0, itemsize, comm=self._comm)
        except MPI.Exception as exc:
            self._comm.Free()
            raise WindowError(
                f"MPI could not create a one-sided window across these ranks ({exc.Get_error_string().strip()}). "
                "With Open MPI between nodes without RDMA, select the UCX component: mpirun --mca osc ucx,sm "
                "(or export OMPI_MCA_osc=ucx,sm before srun)"
            ) from None
        if self.rank == root:
            init = np.zeros(words, dtype=np.int64)
            init[self.slots:self.slots + size] = -1  # no rank has contributed to any step yet
            self._win.Lock(root, MPI.LOCK_EXCLUSIVE)
            self._win.Put([init, _INT64], root)
            self._win.Unlock(root)
        self._comm.Barrier()
        # One passive-target epoch for the window's whole life: each operation is then an RMA call plus a flush.
        self._win.Lock_all()
        self._beat = None

    # --- the word operations -------------------------------------------------------------------------------

    def _fetch_and_op(self, value: int, disp: int, op) -> int:
        origin = np.array([value], dtype=np.int64)
        result = np.zeros(1, dtype=np.int64)
        self._win.Fetch_and_op([origin, _INT64], [result, _INT64], self.root, disp, op)
        self._win.Flush(self.root)
        return int(result[0])

    def _word(self, step: int) -> int:
        return step % self.slots

    def arrive(self, step: int) -> int:
        """Count this rank's arrival at ``step``; return the word's value before it (the arrival order)."""
        return self._fetch_and_op(1, self._word(step), MPI.SUM)

    def close(self, step: int) -> int:
        """Close ``step`` to further arrivals; return the word's value before the close."""
        return self._fetch_and_op(self.CLOSE, self._word(step), MPI.SUM)

    def stop(self, step: int) -> int:
        """Record that this rank stops at ``step``; return the word's value before it."""
        return self._fetch_and_op(self.STOP, self._word(step), MPI.SUM)

    def peek(self, step: int) -> int:
        """Read ``step``'s word atomically without changing it."""
        return self._fetch_and_op(0, self._word(step), MPI.NO_OP)

    def reset(self, step: int) -> None:
        """Zero ``step``'s word for its next use. Only when no rank can still operate on it (see module doc)."""
        self._fetch_and_op(0, self._word(step), MPI.REPLACE)

    @classmethod
    def decode(cls, value: int) -> WordState:
        return WordState(arrivals=value % cls.CLOSE, closes=(value % cls.STOP) // cls.CLOSE, stops=value // cls.STOP)

    # --- progress records ------------------------------------------------------------------------------------

    def mark(self, step: int) -> None:
        """Record that this rank contributed to ``step`` (read back by :meth:`read_marks` to name missing ranks)."""
        self._fetch_and_op(step, self.slots + self.rank, MPI.REPLACE)

    def beat(self, now_ms: int) -> bool:
        """Record that this rank is alive at ``now_ms`` (its heartbeat). Never blocks: while the previous beat
        has not reached the host (a host that is stuck), it sends nothing and returns ``False``."""
        if self._beat is not None and not self._beat[0].Test():
            return False
        origin = np.array([now_ms], dtype=np.int64)
        where = (self.slots + self.size + self.rank, 1, _INT64)
        request = self._win.Raccumulate([origin, _INT64], self.root, target=where, op=MPI.REPLACE)
        self._beat = (request, origin)  # the buffer must live until the operation completes
        return True

    def read_marks(self, timeout: float) -> tuple[list[int], list[int]] | None:
        """Every rank's last marked step (-1: none) and last heartbeat, or ``None`` if the host did not answer
        within ``timeout``. Bounded on purpose: it is called when something is already stuck, maybe the host."""
        n = self.size
        buf = np.zeros(2 * n, dtype=np.int64)
        req = self._win.Rget([buf, _INT64], self.root, target=(self.slots, 2 * n, _INT64))
        if not Backoff(1e-4, 1e-2).poll(req.Test, Deadline(timeout), between=self.progress):
            return None
        return [int(x) for x in buf[:n]], [int(x) for x in buf[n:]]

    def progress(self) -> None:
        """Let MPI make progress (serves other ranks' one-sided operations where the transport needs it)."""
        self._comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)

    # --- failures ---------------------------------------------------------------------------------------------

    def fail(self, message: str) -> None:
        """Record that this rank failed, with a one-line ``message`` (cut to 255 bytes) that :meth:`failed` shows
        the others. Of several failed ranks they see the highest-numbered (an atomic maximum: Open MPI 4.1's
        compare-and-swap on a shared-memory window crashes)."""
        raw = message.encode("utf-8", "replace")[:8 * _MESSAGE_WORDS - 1]
        buf = np.zeros(_MESSAGE_WORDS, dtype=np.int64)
        buf.view(np.uint8)[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self._win.Put([buf, _INT64], self.root, target=(self._messages_at + _MESSAGE_WORDS * self.rank,
                                                         _MESSAGE_WORDS, _INT64))
        self._win.Flush(self.root)  # the message is there before the word names this rank
        self._fetch_and_op(self.rank + 1, self._failed_at, MPI.MAX)

    def failed(self) -> tuple[int, str] | None:
        """``(rank, message)`` of a rank that called :meth:`fail`, or ``None``."""
        who = self._fetch_and_op(0, self._failed_at, MPI.NO_OP)
        if who == 0:
            return None
        rank = who - 1
        buf = np.zeros(_MESSAGE_WORDS, dtype=np.int64)
        self._win.Get([buf, _INT64], self.root, target=(self._messages_at + _MESSAGE_WORDS * rank,
                                                        _MESSAGE_WORDS, _INT64))
        self._win.Flush(self.root)
        return rank, buf.tobytes().split(b"\0", 1)[0].decode("utf-8", "replace")

    # --- lifetime --------------------------------------------------------------------------------------------

    def free(self) -> None:
        """Release the window and the communicator. Collective."""
        if self._win == MPI.WIN_NULL:
            return
        self._win.Unlock_all()
        self._win.Free()
        self._comm.Free()

    def __enter__(self) -> "ArrivalCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.free()
