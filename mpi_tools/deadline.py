"""Deadlines and the one backoff helper used by every wait loop in this project.

Nothing here calls MPI or torch: these are the clocks that the counter's and the optimizer's wait loops share,
so that "how long do we poll, and how often" is decided in one place.
"""

from __future__ import annotations

import math
import threading
import time

__all__ = ["Backoff", "Deadline"]


class Deadline:
    """A point on the monotonic clock; ``Deadline(None)`` never expires."""

    __slots__ = ("seconds", "_end")

    def __init__(self, seconds: float | None, *, start: float | None = None):
        self.seconds = seconds
        now = time.monotonic() if start is None else start
        self._end = math.inf if seconds is None else now + float(seconds)

    @property
    def end(self) -> float:
        return self._end

    def remaining(self) -> float:
        """Seconds left, never negative; ``inf`` when there is no deadline."""
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def __repr__(self) -> str:
        return f"Deadline(seconds={self.seconds}, remaining={self.remaining():.3f})"


class Backoff:
    """Exponential backoff between polls: starts at ``first`` seconds, doubles up to ``cap``.

    ``wait(event)`` sleeps for the current interval, or until ``event`` is set, releasing the GIL; it returns
    ``True`` when the event was set. ``reset()`` goes back to the first interval after progress.
    """

    __slots__ = ("first", "cap", "_next")

    def __init__(self, first: float = 20e-6, cap: float = 1e-3):
        if not 0 < first <= cap:
            raise ValueError(f"Backoff needs 0 < first <= cap, got first={first}, cap={cap}")
        self.first = first
        self.cap = cap
        self._next = first

    def interval(self) -> float:
        """The next interval, and advance the schedule."""
        current = self._next
        self._next = min(self.cap, current * 2)
        return current

    def reset(self) -> None:
        self._next = self.first

    def sleep(self, deadline: Deadline | None = None) -> None:
        dt = self.interval()
        if deadline is not None:
            dt = min(dt, deadline.remaining())
        time.sleep(dt)

    def wait(self, event: threading.Event, deadline: Deadline | None = None) -> bool:
        dt = self.interval()
        if deadline is not None:
            dt = min(dt, deadline.remaining())
        return event.wait(dt)

    def poll(self, predicate, deadline: Deadline, *, between=None) -> bool:
        """Call ``predicate()`` until it is true (returns ``True``) or ``deadline`` expires (``False``).

        ``between()``, when given, runs after each false poll (e.g. to let MPI make progress).
        """
        while True:
            if predicate():
                return True
            if deadline.expired():
                return False
            if between is not None:
                between()
            self.sleep(deadline)
