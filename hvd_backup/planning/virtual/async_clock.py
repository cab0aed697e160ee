"""Asynchronous SGD's clock: who reads which version of the parameters, and when each update lands."""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["AsyncSchedule"]

_READY, _LANDED, _READ = 0, 1, 2  # event kinds: a gradient is ready, its update landed, the new parameters read


class AsyncSchedule:
    """A worker reads the parameters' current version, works ``work(rank, version)`` seconds on a gradient,
    pushes its update through the inbound link of the rank holding the parameters (one push at a time,
    ``move_s`` each), where it lands; then pulls the new parameters through that rank's outbound link (one pull
    at a time, ``move_s`` each) and, ``update_s`` later, reads again. The version is the number of updates
    landed, as the window's counter word numbers them in ``--mode async``."""

    def __init__(self, n: int, work: Callable[[int, int], float], *, move_s: float = 0.0, update_s: float = 0.0):
        self.n, self.work, self.move_s, self.update_s = n, work, move_s, update_s

    def run(self, total: int, read=None, land=None) -> float:
        """Run until every worker has stopped: a worker stops when the version it reads is ``total`` or more, and
        updates already under way still land. ``read(rank, version)`` is called at every read (the training
        computes the gradient there), ``land(rank, read_version, written, time)`` at every landing, in order:
        the update's staleness is ``written - read_version``. Returns the time of the last landing."""
        events: list[tuple[float, int, int, int, int]] = []  # (time, sequence, kind, rank, version read)
        seq, landed, inbound, outbound, last = 0, 0, 0.0, 0.0, 0.0

        def push(at, kind, rank, version):
            nonlocal seq
            heapq.heappush(events, (at, seq, kind, rank, version))
            seq += 1

        def start(rank, at):
            if landed >= total:
                return
            if read is not None:
                read(rank, landed)
            push(at + self.work(rank, landed), _READY, rank, landed)

        for rank in range(self.n):
            start(rank, 0.0)
        while events:
            now, _, kind, rank, version = heapq.heappop(events)
            if kind == _READY:
                inbound = max(now, inbound) + self.move_s
                push(inbound, _LANDED, rank, version)
            elif kind == _LANDED:
                if land is not None:
                    land(rank, version, landed, now)
                landed += 1
                last = now
                outbound = max(now, outbound) + self.move_s
                push(outbound + self.update_s, _READ, rank, version)
            else:
                start(rank, now)
        return last
