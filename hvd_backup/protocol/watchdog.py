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
        while not eng._finished.is_set():
            st, since = eng._current, eng._busy_since
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
            eng._finished.wait(min(1.0, eng._beat_every))
        if eng._error is not None:
            # The training thread raises the error; if the process is still here (a rank stuck in MPI, an
            # interpreter waiting on it at exit), take the whole job down rather than hang.
            time.sleep(self.abort_grace)
            print(f"hvd_backup: rank {eng.rank}: aborting the job after: {eng._error}", file=sys.stderr,
                  flush=True)
            abort(eng.backend.comm)

    def _diagnose(self, st, limit: float) -> HangError | None:
        """Ask the communication thread for the marks and heartbeats; the error to fail with, or ``None`` when
        this rank only waits in ``close()`` and every other rank still beats."""
        self._answered.clear()
        self._ask.set()
        self._answered.wait(min(15.0, limit + 5))
        self._ask.clear()
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
        if not self._answered.is_set():
            return HangError(f"step {st.t}: did not complete within {what}={limit:g}s, and this rank's "
                             f"communication thread is blocked inside MPI (the counter host rank "
                             f"{eng.counter.root} may be stuck or gone)"), {}, None
        found = self._diagnosis
        if found is None:
            return HangError(f"step {st.t}: the counter host rank {eng.counter.root} did not answer (it is stuck "
                             f"or gone) and the step did not complete within {what}={limit:g}s"), {}, None
        marks, beats = found
        now_ms = 1e3 * eng.clock.now()
        silent_for = {r: (now_ms - b) / 1e3 for r, b in enumerate(beats)
                      if r != eng.rank and now_ms - b > 2e3 * eng._beat_every + 1e3}
        culprits = sorted({r for r, m in enumerate(marks) if m < st.t} | set(silent_for))
        detail = ""
        if silent_for:
            quiet = ", ".join(f"rank {r} for {s:.0f}s" for r, s in sorted(silent_for.items()))
            detail = f" (no heartbeat from {quiet})"
        if eng._stopping:
            culprits = sorted(silent_for)
        return HangError(f"step {st.t}: ranks {culprits} did not contribute within {what}={limit:g}s{detail}"), \
            silent_for, culprits

