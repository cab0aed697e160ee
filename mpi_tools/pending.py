"""Nonblocking operations kept with the buffers they use until they complete."""

from __future__ import annotations

from mpi4py import MPI

__all__ = ["Pending"]


class Pending:
    """Requests posted by one thread, each group with the buffers it reads or writes (they must live until the
    requests complete); :meth:`prune` lets go of the groups that are complete."""

    __slots__ = ("_groups",)

    def __init__(self):
        self._groups: list[tuple[list[MPI.Request], tuple]] = []

    def add(self, requests, *buffers) -> None:
        """Keep ``requests`` (posted already) and ``buffers`` until all of them complete."""
        if requests:
            self._groups.append((list(requests), buffers))

    def prune(self) -> bool:
        """Test every group once (nonblocking); return whether any is still pending."""
        if self._groups:
            self._groups = [g for g in self._groups if not MPI.Request.Testall(g[0])]
        return bool(self._groups)

    def __bool__(self) -> bool:
        return bool(self._groups)
