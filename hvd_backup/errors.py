"""Errors a user can fix, and how every rank comes to the same verdict about them."""

from __future__ import annotations

import traceback

__all__ = ["HangError", "ProtocolError", "UserError", "agree"]


class UserError(ValueError):
    """Bad input: reported as one line by rank 0, exit code 2 on every rank."""


class HangError(RuntimeError):
    """A step did not complete within ``hang_timeout``."""


class ProtocolError(RuntimeError):
    """The ranks disagree about a step (a bug, or ranks running different programs)."""


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
