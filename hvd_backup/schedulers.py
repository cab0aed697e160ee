"""Learning-rate schedulers in users' loops: a scheduler stepped once per ``step()`` call must stand at the
global step's position on every rank, also on a rank that skipped steps by catching up.

The optimizer does not know its schedulers (they hold it, not the other way round), so they are found among
the live objects: at the first ``step()``, when a new scheduler patches the optimizer's ``step``, and at a
catch-up once in a while. A scheduler counts as per-iteration once its ``last_epoch`` has advanced exactly once
per ``step()`` call since it was found.
"""

from __future__ import annotations

import gc
import time
import weakref

from torch.optim.lr_scheduler import LRScheduler

__all__ = ["SchedulerFollower"]


class SchedulerFollower:
    RESCAN_S = 10.0

    def __init__(self, *optimizers):
        self._targets = [weakref.ref(o) for o in optimizers]
        self._known: dict[int, tuple[weakref.ref, int, int]] = {}  # id -> (scheduler, calls then, last_epoch then)
        self._scanned_at: float | None = None
        self._patch = None

    def _scan(self, calls: int) -> None:
        targets = [t() for t in self._targets]
        for obj in gc.get_objects():
            if issubclass(type(obj), LRScheduler) and id(obj) not in self._known and any(
                    getattr(obj, "optimizer", None) is t for t in targets if t is not None):
                self._known[id(obj)] = (weakref.ref(obj), calls, obj.last_epoch)
        self._scanned_at = time.monotonic()

    def before_step(self, opt, calls: int) -> None:
        """At every ``step()`` call (``calls`` made before it): look for schedulers when something changed."""
        patch = opt.__dict__.get("step")
        if self._scanned_at is None or patch is not self._patch:
            self._patch = patch
            self._scan(calls)

    def after_catch_up(self, calls: int, extra: int) -> None:
        """This ``step()`` call (the ``calls``-th) moved the parameters ``extra`` global steps further than one:
        step every per-iteration scheduler ``extra`` more times."""
        if extra <= 0:
            return
        if time.monotonic() - self._scanned_at > self.RESCAN_S:
            self._scan(calls)
        for key, (ref, calls_then, epoch_then) in list(self._known.items()):
            sched = ref()
            if sched is None:
                del self._known[key]
                continue
            if calls > calls_then and sched.last_epoch - epoch_then == calls - calls_then:
                for _ in range(extra):
                    sched.step()
                self._known[key] = (ref, calls_then - extra, epoch_then)  # keeps its rate one per call
