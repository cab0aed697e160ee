"""Step 7 of :mod:`hvd_backup.protocol`: never hang. A watchdog thread fails a step that outlives
``hang_timeout`` with an error naming the ranks that never contributed (from the per-rank marks and heartbeats
in the counter window), and takes the job down if the process is still alive shortly after a failure."""

from __future__ import annotations

import sys
import threading
import time

from ..errors import HangError
from ..lifecycle import abort

__all__ = ["Watchdog"]

_LOOK_AGAIN = object()  # _diagnose: no error yet, the watchdog has set when to look again


class Watchdog:
    """One per rank, beside the communication thread. Reads of the counter window stay on the communication
    thread (Open MPI's UCX one-sided component is not safe with two threads operating at once): the watchdog
    asks, :meth:`serve` answers from the communication thread's polling loop."""

    def __init__(self, eng, *, abort_grace: float):
        self.eng = eng
        self.abort_grace = abort_grace
        self.blocked = False  # the last diagnosis found the communication thread blocked inside MPI
        self._ask = threading.Event()
        self._answered = threading.Event()
        self._diagnosis = None
        self._looked_again = None  # the step whose diagnosis named no one once already
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="hvd_backup-watchdog", daemon=True)
        self._thread.start()

    def serve(self) -> None:
        """On the communication thread: read the marks and heartbeats if the watchdog asked."""
        if self._ask.is_set() and not self._answered.is_set():
            self._diagnosis = self.eng.counter.read_marks(timeout=min(10.0, self.eng.hang_timeout))
            self._answered.set()

    def _watch(self) -> None:
        eng = self.eng
        tick = min(1.0, eng._beat_every)
        last = resumed = time.monotonic()
        while not eng._finished.is_set():
            now = time.monotonic()
            if now - last > tick + 5:
                # This process did not run for a while (stopped, a paused machine): the time it lost is not
                # the other ranks' fault, and a frozen rank that resumes must not blame them at once.
                resumed = now
            last = now
            st, since = eng._current, self._since()
            since = max(since, resumed) if since is not None else None
            if eng._error is not None:
                break
            limit = eng.hang_timeout if eng.warm else eng.startup_timeout
            if st is not None and since is not None and time.monotonic() - since > limit:
                error = self._diagnose(st, limit)
                if error is _LOOK_AGAIN:
                    continue
                if error is None:  # waiting in close() for ranks that are alive and still training
                    eng._busy_since = time.monotonic()
                    continue
                eng.fail(error)
                break
            eng._finished.wait(tick)
        if eng._error is not None:
            # The training thread raises the error; if the process is still here (a rank stuck in MPI, an
            # interpreter waiting on it at exit), take the whole job down rather than hang.
            time.sleep(self.abort_grace)
            print(f"hvd_backup: rank {eng.rank}: aborting the job after: {eng._error}", file=sys.stderr,
                  flush=True)
            abort(eng.backend.comm)

    def diagnosis_wait(self, limit: float | None = None) -> float:
        """How long a diagnosis waits for the communication thread to read the marks (blocked inside MPI: never)."""
        return min(15.0, (self.eng.hang_timeout if limit is None else limit) + 5)

    def verdict_wait(self) -> float:
        """How much longer than this rank another may take to find the same hang: the diagnosis wait, unless
        this rank waited that out already (its communication thread was blocked inside MPI)."""
        return 0.0 if self.blocked else self.diagnosis_wait()

    def _since(self) -> float | None:
        """When this rank's part in the current step began: the communication thread's arrival, or, before it,
        the training thread's hand-in that the communication thread has not taken yet. A thread blocked inside
        MPI between steps (polling a counter host it cannot reach) never takes it, and the training thread
        would wait in ``submit`` forever."""
        eng = self.eng
        since = eng._busy_since
        if since is None:
            pending = eng._pending
            if pending is not None and pending.reply is None and not pending.arrived:
                since = pending.submitted_at
        return since

    def _diagnose(self, st, limit: float) -> HangError | None:
        """Ask the communication thread for the marks and heartbeats; the error to fail with, or ``None`` when
        this rank only waits in ``close()`` and every other rank still beats."""
        self._answered.clear()
        self._ask.set()
        self._answered.wait(self.diagnosis_wait(limit))
        self._ask.clear()
        self.blocked = not self._answered.is_set()
        error, silent, culprits = self._hang_error(st, limit)
        if self.eng._stopping and self._answered.is_set() and self._diagnosis is not None and not silent:
            return None
        if culprits == [] and self._looked_again != st.t:
            # No one to name yet: this rank's step began before the culprit stopped, whose heartbeat is not
            # stale yet. Look again once it would be; once per step, so that a hang with every rank beating
            # still fails.
            self._looked_again = st.t
            self.eng._busy_since = time.monotonic() - limit + 2 * self.eng._beat_every + 1.5
            return _LOOK_AGAIN
        return error

    def _hang_error(self, st, limit: float) -> tuple[HangError, dict, list | None]:
        """Name the ranks that never posted this step, or that posted it and then went silent (killed, frozen);
        with the silent ranks and for how long, and the ranks named (``None``: the marks could not be read)."""
        eng = self.eng
        what = "hang_timeout" if eng.warm else "startup_timeout"
        root = eng.counter.root
        # Which ranks are missing is unknown without the counter's marks: list those on other hosts, the likely
        # ones when a host or its link is lost.
        elsewhere = [r for r, host in enumerate(eng.hosts) if host != eng.hosts[eng.rank]]
        others = f"; ranks on other hosts: {self._placed(elsewhere)}" if elsewhere else ""
        if not self._answered.is_set():
            here = eng.hosts[eng.rank]
            # Open MPI's one-sided component takes a lock on the counter host for each atomic operation: a rank
            # lost while holding it blocks the others' operations, the counter host's own included.
            why = (f"the counter host rank {root} on {eng.hosts[root]} may be stuck, gone or cut off from {here}, "
                   f"this rank's host" if eng.hosts[root] != here else
                   f"the counter host rank {root}, on this rank's host {here}, may be stuck or gone, or a lost "
                   f"rank holds the lock of its window")
            return HangError(f"step {st.t}: did not complete within {what}={limit:g}s, and this rank's "
                             f"communication thread is blocked inside MPI ({why}){others}"), {}, None
        found = self._diagnosis
        if found is None:
            return HangError(f"step {st.t}: the counter host rank {root} on {eng.hosts[root]} did not answer (it "
                             f"is stuck, gone or cut off) and the step did not complete within "
                             f"{what}={limit:g}s{others}"), {}, None
        marks, beats = found
        now_ms = 1e3 * eng.clock.now()
        members = eng.members
        if members is not None and not members.attached[eng.rank]:
            return HangError(f"step {st.t}: this rank was detached (left out of {members.after} steps in a row) "
                             f"and the counter host rank {root} on {eng.hosts[root]} did not send the state to "
                             f"attach it again within {what}={limit:g}s of asking"), {}, None
        silent_for = {r: (now_ms - b) / 1e3 for r, b in enumerate(beats)
                      if r != eng.rank and now_ms - b > 2e3 * eng._beat_every + 1e3}
        culprits = sorted({r for r, m in enumerate(marks) if m < st.t and (members is None or members.attached[r])}
                          | set(silent_for))
        detail = ""
        if silent_for:
            quiet = ", ".join(f"rank {r} for {s:.0f}s" for r, s in sorted(silent_for.items()))
            detail = f" (no heartbeat from {quiet})"
        if eng._stopping:
            culprits = sorted(silent_for)
        where = f", on {self._placed(culprits)}" if culprits else ""
        return HangError(f"step {st.t}: ranks {culprits} did not contribute within {what}={limit:g}s{detail}"
                         f"{where}"), silent_for, culprits

    def _placed(self, ranks: list[int], most: int = 8) -> str:
        """``h2 (ranks 2, 3), h3 (rank 5)``: the hosts of ``ranks``, the first ``most`` of them named."""
        by_host: dict[str, list[int]] = {}
        for r in ranks:
            by_host.setdefault(self.eng.hosts[r], []).append(r)
        named = [f"{host} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                 for host, rs in list(by_host.items())[:most]]
        if len(by_host) > most:
            named.append(f"and {len(by_host) - most} more hosts")
        return ", ".join(named)

