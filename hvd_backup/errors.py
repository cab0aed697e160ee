"""Errors a user can fix, and how every rank comes to the same verdict about them."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

__all__ = ["HangError", "ProtocolError", "RankFailedError", "UserError", "agree", "report", "same_on_every_rank"]


class UserError(ValueError):
    """Bad input: reported as one line by rank 0, exit code 2 on every rank."""


class HangError(RuntimeError):
    """A step did not complete within ``hang_timeout``."""


class ProtocolError(RuntimeError):
    """The ranks disagree about a step (a bug, or ranks running different programs)."""


class RankFailedError(RuntimeError):
    """Another rank failed (an exception left its training script); ``rank`` and, where it could travel, the
    one-line ``cause``."""

    def __init__(self, message: str, *, rank: int, cause: str = ""):
        super().__init__(message)
        self.rank, self.cause = rank, cause


def agree(comm, fn):
    """Run ``fn()`` on every rank; if it raised a ``ValueError`` (bad input) on any rank, raise ``UserError``
    with the first rank's message on all of them, so no rank is left waiting in a collective. Any other
    exception is printed with its traceback by the rank that had it and reported the same way."""
    result, error = None, None
    try:
        result = fn()
    except ValueError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug on one rank must not hang the others
        traceback.print_exc()
        error = f"rank {comm.Get_rank()}: {type(exc).__name__}: {exc}"
    errors = comm.allgather(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first)
    return result


def same_on_every_rank(comm, values: dict, label: Callable[[str], str]) -> None:
    """Collective: raise ``ValueError`` on every rank if any rank's ``values`` differ from rank 0's, naming the
    first such setting (``label(name)`` writes its name as the user did) and the rank."""
    everyone = comm.allgather(values)
    for rank, theirs in enumerate(everyone):
        for key, value in theirs.items():
            if value != everyone[0].get(key):
                raise ValueError(f"{label(key)} differs across ranks: rank 0 has {everyone[0].get(key)!r}, "
                                 f"rank {rank} has {value!r}")


def report(exc: BaseException, rank: int) -> None:
    """Print ``exc`` as this rank's one error line (``hvd_backup: rank R: ...``), once, however many places
    (the protocol's thread, the training script's handler) see it."""
    if getattr(exc, "_hvd_backup_reported", False):
        return
    print(f"hvd_backup: rank {rank}: {exc}", file=sys.stderr, flush=True)
    exc._hvd_backup_reported = True
