"""Detached ranks (``detach_after``): a rank behind a slow link, blamed for that many slow steps in a row, stops
taking part in the step's allreduce, so that its link no longer paces the others' steps (with its gradient or
its zeros); it follows by state transfers and is attached again, at an agreed step, by one.

The counter's host decides; every attached rank reads its decisions in a step's reduced metadata, so all agree on
who takes part in each step without another message:

* **Detach.** A slow link does not make a rank late: the step's allreduce waits for its data (or its zeros)
  whether it is in or not, so every rank finishes the step at about the same time, and every step is slow. The
  counter's host notices a step over ``SLOW`` times the usual and probes every attached rank with
  ``PROBE_BYTES`` (a small message goes through a congested link in milliseconds; data cannot). After
  ``detach_after`` probe rounds in a row blaming the same rank (:meth:`Membership.blame`; never the counter's
  host, never one that left its loop), the host names it in the next step's metadata (block ``DETACH``): every
  attached rank reads it after that step's reduce, and the rank is out from the step after, as long as at least
  N - b ranks stay attached. The attached ranks then count arrivals and close steps among themselves and reduce
  on a communicator of their own (``Backend.use``).
* **Follow.** A detached rank is served like a parameter-server worker: each gradient its training thread hands
  in is answered (status ``caught_up``) with the counter host's parameters and optimizer state of its current step
  (one message each way, at the pace of its link), so its loop crosses the same global-step boundaries as the
  others' and meets them in collectives of its own (evaluation, checkpoints) instead of leaving them waiting.
* **Ask.** After 5 s, doubling with each detachment up to 60 s, or at once when it leaves its loop
  (``close()``), the detached rank asks to be attached again. When every attached rank has left, the host
  attaches every detached rank without being asked (the steps until then are empty: no update), so that no rank
  is left behind at the end.
* **Join.** The host names the rank and its join step ``t + 2`` in step ``t``'s metadata (block ``JOIN``); after
  step ``t + 1`` it sends the rank that step's state and who is attached then, and who joins when. The rank loads the state as its consensus copy and takes part from the join step on.

The counter's words are never touched by a detached rank, and the host resets a word only after the step after
it completed among the attached ranks, so the one-slot-per-step rule of :mod:`mpi_tools.counter` holds.
"""

from __future__ import annotations

import io
import pickle
import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_tools import Backoff, Pending

from ..errors import ProtocolError
from .apply import catch_up
from .state import Meta, StepState

__all__ = ["Membership", "wait_detached"]

_HEADER, _STATE, _ASK, _PROBE, _ACK = 71, 72, 73, 74, 75  # message tags
STATE, JOIN = 1, 2  # what a detached rank asks for, and what a header announces
FIRST_ASK, LAST_ASK = 5.0, 60.0  # seconds a detached rank waits before it asks to be attached again
HISTORY, HISTORY_MIN = 20, 5  # steps that say what a usual step takes, and the fewest before one is called slow
SLOW, SLOW_FLOOR = 4.0, 0.05  # a slow step: over this many times the usual step time, and over this many seconds
PROBE_BYTES, PROBE_WAIT = 1 << 16, 2.0  # a probe's size, and how long the host waits for its acknowledgement
LINK, LINK_FLOOR = 10.0, 0.02  # a slow link: a probe over this many times the others' median, and these seconds


class Membership:
    """Which ranks take part in the steps; on the counter's host, who is detached and attached again, and the
    transfers that go with it. Created collectively."""

    def __init__(self, eng, after: int):
        self.eng, self.after = eng, int(after)
        n = eng.size
        self.root = eng.counter.root
        self.host = eng.rank == self.root
        self.attached = [True] * n  # the same on every attached rank: changed only by the host's announcements
        self.joins: dict[int, list[int]] = {}  # step -> ranks attached again from it
        self.detachments = 0  # of this rank
        self.comm = eng.backend.comm.Dup()  # asks, probes, headers and states (point to point)
        self._echo: list = []  # a probe being received, then its acknowledgement being sent (not the host)
        # The counter's host only:
        self._steps: list[float] = []  # the median step time of recent steps that were not slow
        self._probe: dict[int, list] | None = None  # a probe round: rank -> [requests, buffers, sent at, took]
        self._blamed = [-1, 0]  # the rank the last probe rounds blamed, and how many rounds in a row
        self._detach: int | None = None  # blamed often enough: detached in the next metadata the host fills
        self._asked: set[int] = set()
        self._announced: set[int] = set()
        self._send_at: dict[int, list[int]] = {}  # join step -> ranks whose state goes out after the step before
        self._skipped: dict[int, list[bool]] = {}  # per detached rank, per step it missed: was the update skipped?
        self._outgoing = Pending()  # states and probes on their way

    def ranks(self) -> tuple[int, ...]:
        return tuple(r for r, a in enumerate(self.attached) if a)

    def count(self) -> int:
        return sum(self.attached)

    def detached(self) -> list[int]:
        return [r for r, a in enumerate(self.attached) if not a]

    def begin(self, t: int) -> None:
        """Step ``t`` starts: the ranks announced to join at it are attached."""
        for r in self.joins.pop(t, []):
            self.attached[r] = True
            self._announced.discard(r)

    def announce(self, st: StepState, meta: torch.Tensor) -> None:
        """The host, filling step ``st.t``'s metadata: the rank to detach from the next step on; the detached
        ranks that asked (all of them when every attached rank has left) join at ``st.t + 2``."""
        if not self.host:
            return
        n, r = self.eng.size, self._detach
        self._detach = None
        if r is not None and self.attached[r] and self.count() - 1 >= self.eng.quorum and not self.eng._stopping:
            meta[Meta.DETACH * n + r] = float(st.t + 1)
        want = set(self.detached()) if st.empty else self._asked & set(self.detached())
        self._asked.clear()
        for r in sorted(want - self._announced):
            meta[Meta.JOIN * n + r] = float(st.t + 2)
            self._announced.add(r)

    def observe(self, st: StepState, block: list[list[float]], record) -> None:
        """After step ``st.t``'s reduce, on every attached rank alike: the host's announcements (detached from the
        next step on; joins); on the host, whether the step was slow (then a probe round finds whose link)."""
        for r, s in enumerate(block[Meta.DETACH]):
            if s > 0:
                self.attached[r] = False
        for r, s in enumerate(block[Meta.JOIN]):
            if s > 0:
                self.joins.setdefault(int(s), []).append(r)
                if self.host:
                    self._send_at.setdefault(int(s), []).append(r)
        if not self.host:
            return
        for r in self.detached():
            self._skipped.setdefault(r, []).append(record.skipped)
        if self._slow(record.duration_s) and self._probe is None:
            self._start_probe(block)

    def _slow(self, step: float) -> bool:
        """Whether the step just done took over ``SLOW`` times the usual (learnt from the steps that were not
        slow) and over ``SLOW_FLOOR``, as the host saw it."""
        usual = sorted(self._steps)[len(self._steps) // 2] if len(self._steps) >= HISTORY_MIN else None
        if usual is not None and step > max(SLOW * usual, SLOW_FLOOR):
            return True
        if step > 0:
            self._steps = (self._steps + [step])[-HISTORY:]
        return False

    def _start_probe(self, block: list[list[float]]) -> None:
        """A slow step: a slow link does not make its rank late (the step's allreduce waits for its data, or
        its zeros, whether it is in or not, so every rank ends the step at about the same time), and a small
        atomic operation goes through it in milliseconds. What it cannot do fast is carry data: the host sends
        every attached rank ``PROBE_BYTES`` and times the acknowledgement."""
        candidates = [r for r in self.ranks() if r != self.root and block[Meta.LEFT][r] == 0]
        if not candidates:
            return
        self._probe = {}
        for r in candidates:
            data, ack = np.zeros(PROBE_BYTES, dtype=np.uint8), np.zeros(1, dtype=np.int64)
            requests = [self.comm.Isend([data, MPI.BYTE], r, _PROBE), self.comm.Irecv([ack, MPI.INT64_T], r, _ACK)]
            self._probe[r] = [requests, (data, ack), time.monotonic(), None]

    def _finish_probe(self) -> None:
        """The host, between polls: time the acknowledgements; once all are in (or ``PROBE_WAIT`` is over),
        blame the rank whose probe took over ``LINK`` times the others' median and over ``LINK_FLOOR``; detach
        it once ``after`` rounds in a row blamed it."""
        now = time.monotonic()
        for entry in self._probe.values():
            if entry[3] is None and entry[0][1].Test():
                entry[3] = now - entry[2]
        started = min(e[2] for e in self._probe.values())
        if any(e[3] is None for e in self._probe.values()) and now - started < PROBE_WAIT:
            return
        took = {r: e[3] if e[3] is not None else PROBE_WAIT for r, e in self._probe.items()}
        # An unanswered probe stays posted until its answer comes: a rank on a slow link still sends it.
        for e in self._probe.values():
            self._outgoing.add(e[0], e[1])
        self._probe = None
        culprit = self.blame(took)
        self._blamed = [culprit, self._blamed[1] + 1 if culprit == self._blamed[0] else 1] if culprit is not None \
            else [-1, 0]
        if culprit is not None and self._blamed[1] >= self.after:
            self._detach, self._blamed = culprit, [-1, 0]

    @staticmethod
    def blame(took: dict[int, float]) -> int | None:
        """The rank whose probe took over ``LINK`` times the others' median and over ``LINK_FLOOR``, if any."""
        worst = max(took, key=took.get)
        others = sorted(v for r, v in took.items() if r != worst) or [0.0]
        typical = others[len(others) // 2]
        return worst if took[worst] > max(LINK * typical, LINK_FLOOR) else None

    def _answer_probe(self) -> None:
        """Not the host, between polls: receive the host's probe and acknowledge it."""
        if not self._echo:
            if not self.comm.Iprobe(self.root, _PROBE):
                return
            data = np.empty(PROBE_BYTES, dtype=np.uint8)
            self._echo = [self.comm.Irecv([data, MPI.BYTE], self.root, _PROBE), data, None]
        if self._echo[2] is None:
            if self._echo[0].Test():
                ack = np.ones(1, dtype=np.int64)
                self._echo[2] = (self.comm.Isend([ack, MPI.INT64_T], self.root, _ACK), ack)
        elif self._echo[2][0].Test():
            self._echo = []

    def after_apply(self, t: int) -> None:
        """The host, after applying step ``t``: send the ranks that join at ``t + 1`` the state of that step, with
        its view of who is attached, who missed how many steps and who joins when (so that each joining rank
        decides as the others from the join step on)."""
        going = self._send_at.pop(t + 1, [])
        if not going:
            return
        view = {"attached": list(self.attached), "joins": {s: list(rs) for s, rs in self.joins.items()}}
        state = self._state(t + 1)  # exported once for all the ranks that join
        for r in going:
            self._send(r, JOIN, t + 1, state, view)

    def _state(self, version: int) -> bytes:
        """The host's parameters and optimizer state of step ``version`` (live or the consensus copy's)."""
        eng = self.eng
        if eng.version == version:
            return eng.side.export_state(True)
        if eng.consensus_version == version:
            return eng.side.export_state(False)
        raise ProtocolError(f"the counter's host holds no state of step {version} (live {eng.version}, "
                            f"consensus {eng.consensus_version})")

    def _send(self, r: int, kind: int, version: int, state: bytes, view: dict | None = None) -> None:
        eng = self.eng
        payload = _pack(state, eng._last_record, self._skipped.pop(r, []), view)
        header = np.array([kind, version, payload.size], dtype=np.int64)
        requests = [self.comm.Isend([header, MPI.INT64_T], r, _HEADER),
                    self.comm.Isend([payload, MPI.BYTE], r, _STATE)]
        self._outgoing.add(requests, header, payload)

    def serve(self) -> None:
        """Between polls (never inside an update). The host: answer the asks (a state of the current step at
        once; a join through the next step's metadata), time a probe round, complete the sends. The others:
        acknowledge a probe."""
        if not self.host:
            self._answer_probe()
            return
        if self._probe is not None:
            self._finish_probe()
        status = MPI.Status()
        while self.comm.Iprobe(MPI.ANY_SOURCE, _ASK, status):
            ask = np.zeros(2, dtype=np.int64)
            self.comm.Recv([ask, MPI.INT64_T], status.Get_source(), _ASK)
            r, kind = int(ask[0]), int(ask[1])
            if self.attached[r] or r in self._announced:
                continue  # attached, or about to be: it gets the join's state
            if kind == JOIN:
                self._asked.add(r)
            else:
                self._send(r, STATE, self.eng.step, self._state(self.eng.step))
        self._outgoing.prune()

    def drain(self, timeout: float) -> None:
        """The host, at the end: let the last states reach their ranks (bounded)."""
        end = time.monotonic() + timeout
        while self._outgoing and time.monotonic() < end:
            self.serve()
            time.sleep(1e-3)

    def free(self) -> None:
        self.comm.Free()


def _pack(data: bytes, record, skipped: list[bool], view: dict | None) -> np.ndarray:
    out = io.BytesIO()
    pickle.dump({"state": data, "record": record, "skipped": skipped, "view": view}, out,
                protocol=pickle.HIGHEST_PROTOCOL)
    return np.frombuffer(out.getvalue(), dtype=np.uint8).copy()


def wait_detached(eng, st: StepState) -> None:
    """A detached rank's communication thread, from step ``st.t`` (where it was detached) until it is attached
    again: each gradient its training thread hands in is answered with the host's current parameters and
    optimizer state (a catch-up, at the pace of its link); once due, or when it leaves its loop, it asks to be
    attached again. Returns with ``eng.step`` at the join step."""
    m, root = eng.members, eng.counter.root
    m.detachments += 1
    due = time.monotonic() + min(LAST_ASK, FIRST_ASK * 2 ** (m.detachments - 1))
    backoff = Backoff(1e-4, 0.01)
    header = np.zeros(3, dtype=np.int64)
    incoming = m.comm.Irecv([header, MPI.INT64_T], root, _HEADER)
    asks: dict[int, tuple] = {}  # kind -> (request, buffer): at most one of each outstanding
    next_ask = 0.0  # no state asked for before then: the last answer brought nothing newer

    def ask(kind: int) -> None:
        mine = np.array([eng.rank, kind], dtype=np.int64)
        asks[kind] = (m.comm.Isend([mine, MPI.INT64_T], root, _ASK), mine)
        eng._busy_since = time.monotonic()  # the watchdog gives the answer hang_timeout

    while True:
        if JOIN not in asks and (eng._stopping or time.monotonic() >= due):
            ask(JOIN)
        if not asks and time.monotonic() >= next_ask:
            with eng._cond:
                sub = eng._pending
                waiting = sub is not None and sub.reply is None and sub.sealed
            if waiting:
                ask(STATE)
        if incoming.Test():
            kind, version = int(header[0]), int(header[1])
            got = _receive(eng, int(header[2]))
            if version <= eng.step and kind == STATE:
                next_ask = time.monotonic() + 0.05  # the others have not moved on: ask again in a while
            _load(eng, got, version)
            if kind == STATE and STATE in asks:
                asks.pop(STATE)[0].Wait()
            if kind == JOIN:
                view = got["view"]  # the host's, after the step before the join: begin(join) attaches this rank
                m.attached = list(view["attached"])
                m.joins = {int(s): list(rs) for s, rs in view["joins"].items()}
                for request, _ in asks.values():
                    request.Wait()
                eng._busy_since = None
                return
            if not asks:
                eng._busy_since = None
            incoming = m.comm.Irecv([header, MPI.INT64_T], root, _HEADER)
        eng.tend()
        backoff.sleep()


def _receive(eng, size: int) -> dict:
    payload = np.empty(size, dtype=np.uint8)
    incoming = eng.members.comm.Irecv([payload, MPI.BYTE], eng.counter.root, _STATE)
    backoff = Backoff(1e-4, 0.01)
    while not incoming.Test():
        eng.tend()
        backoff.sleep()
    return pickle.loads(payload.tobytes())


def _load(eng, got: dict, version: int) -> None:
    """Make the received state the consensus copy at ``version`` and catch up a waiting hand-in to it."""
    tic = time.perf_counter()
    eng.side.import_state(got["state"])
    eng.timings.add("detached_state", time.perf_counter() - tic)
    missed = version - eng.step
    skipped = list(got["skipped"])[-missed:] if got["skipped"] and missed > 0 else []
    with eng._cond:
        eng._covered.extend([False] * (missed - len(skipped)) + skipped)
    if got["record"] is not None:
        eng._last_record = got["record"]
    eng.consensus_version = eng.step = version
    with eng._cond:
        sub = eng._pending
        ready = sub is not None and sub.reply is None and sub.sealed and sub.version < version
    if ready:
        catch_up(eng, sub)
