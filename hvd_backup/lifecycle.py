"""How a process that uses the protocol ends, whatever its script does: an uncaught exception is announced to the
other ranks (they raise ``RankFailedError`` within about a second) and the process exits non-zero without
waiting in ``MPI_Finalize`` for peers that may be gone; a clean exit closes the optimizers still open.

Python runs these handlers before it stops its daemon threads and before MPI is finalized, so they work where
the protocol's own threads no longer can.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref

from .errors import report

__all__ = ["abort", "advise_keepalives", "announce", "keepalive_advice", "register", "unregister"]

_live = weakref.WeakSet()  # optimizers not closed yet
_state = {"installed": False, "failed": False}
GRACE_S = 3.0  # a failed rank lingers this long after announcing, so the others print the cause first


def keepalive_advice(hosts: list[str], environ=os.environ) -> str | None:
    """A one-line warning when the ranks run on several hosts under ``mpirun`` (or ``horovodrun``, which runs it)
    without TCP keepalives for Open MPI's runtime: after a lost link every rank still ends within
    ``hang_timeout``, but mpirun and the daemon on the far side notice nothing for minutes (docs/RELIABILITY.md,
    M3). mpirun passes the ``--mca`` settings on its command line to the ranks' environment."""
    if len(set(hosts)) < 2 or not environ.get("OMPI_MCA_orte_launch") \
            or environ.get("OMPI_MCA_oob_tcp_keepalive_time"):
        return None
    return (f"hvd_backup: {len(set(hosts))} hosts under mpirun without short TCP keepalives for Open MPI's runtime: "
            "if a host's link is lost every rank still ends within hang_timeout, but mpirun and its daemons can "
            "stay for up to about 23 minutes; run mpirun with --mca oob_tcp_keepalive_time 20 --mca "
            "oob_tcp_keepalive_intvl 5 --mca oob_tcp_keepalive_probes 4 (unless an mca-params.conf sets them)")


def advise_keepalives(hosts: list[str]) -> None:
    """Print :func:`keepalive_advice`, if any, once per process (on the rank that calls it)."""
    advice = keepalive_advice(hosts)
    if advice and not _state.get("advised"):
        _state["advised"] = True
        print(advice, file=sys.stderr, flush=True)


def register(opt) -> None:
    """Track ``opt`` (a ``DistributedOptimizer``) until it is closed; install the handlers once."""
    _live.add(opt)
    if _state["installed"]:
        return
    _state["installed"] = True
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        previous(kind, value, tb)  # the real cause first, with its traceback
        announce(value)

    sys.excepthook = excepthook
    atexit.register(_at_exit)


def unregister(opt) -> None:
    _live.discard(opt)


def announce(exc: BaseException) -> None:
    """Tell every other rank that this one failed with ``exc`` (not for errors that only relay another rank's
    failure or a hang: every rank sees those by itself)."""
    from .errors import HangError, RankFailedError

    if isinstance(exc, (HangError, RankFailedError)):
        return
    _state["failed"] = True
    message = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    for opt in list(_live):
        opt._hvdb_engine.announce_failure(message)


def _failed() -> bool:
    return _state["failed"] or any(opt._hvdb_engine._error is not None for opt in list(_live))


def _exit_now(linger: float) -> None:
    """Take the job down: ``MPI_Abort``, so the launcher ends every rank (also one that is frozen), and this
    process in any case (see :func:`abort`)."""
    time.sleep(linger)
    opts = list(_live)
    if opts:
        abort(opts[0]._hvdb_comm)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _linger() -> float:
    """How long a failed process waits before it takes the job down: a rank that failed by itself long enough
    for the others to print the cause it announced; a rank that found a hang long enough for the others to reach
    their own verdict (each times the step by itself, and may wait for a diagnosis), so that every rank says
    what it saw; a rank that relays another's failure as long as the failed one, so that all of them print it."""
    from .errors import HangError

    if _state["failed"]:
        return GRACE_S
    hangs = [opt._hvdb_engine for opt in list(_live) if isinstance(opt._hvdb_engine._error, HangError)]
    return max((eng.watchdog.verdict_wait() + 2.0 for eng in hangs), default=GRACE_S)


def _at_exit() -> None:
    if _failed():
        _exit_now(_linger())
    for opt in list(_live):
        try:
            opt.close()
        except BaseException as exc:  # noqa: BLE001 - a hang or a peer's failure at exit: end, do not finalize
            report(exc, opt.rank)
            _exit_now(0.0)


def abort(comm) -> None:
    """End every rank of the job: ``MPI_Abort`` on ``comm``, and this process in any case a few seconds later
    (an abort can block where the network to the launcher is gone)."""
    sys.stdout.flush()
    name = comm.Get_name() or f"a communicator of {comm.Get_size()} ranks"
    print(f"hvd_backup: rank {comm.Get_rank()}: ending the job (MPI_Abort on {name})", file=sys.stderr, flush=True)
    last_resort = threading.Timer(5.0, os._exit, (1,))
    last_resort.daemon = True
    last_resort.start()
    try:
        comm.Abort(1)
    finally:
        os._exit(1)
