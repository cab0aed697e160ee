"""Test set-up shared by every suite.

* A hard deadline per test: ``faulthandler`` dumps every thread's stack when a test outlives
  ``HVD_BACKUP_TEST_TIMEOUT`` seconds (default 180) and SIGALRM ends the process just after, so a deadlock
  fails fast with stacks.
* Under ``mpirun`` (tests/mpi): one verdict for all ranks. After each phase of a test the ranks exchange
  their outcomes, and a test that failed on any rank fails on all of them, naming the ranks; so the ranks
  stay in step and ``mpirun`` exits non-zero. Each rank writes its own JUnit file when
  ``HVD_BACKUP_JUNIT_DIR`` is set, and ranks other than 0 report quietly (their failures still show).
"""

import faulthandler
import os
import signal
import sys

import pytest

TEST_TIMEOUT = float(os.environ.get("HVD_BACKUP_TEST_TIMEOUT", "180"))
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def world():
    """``MPI.COMM_WORLD`` when this process is a rank of an MPI job, else ``None`` (MPI not initialised)."""
    if not any(name in os.environ for name in _MPI_ENV):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    comm = world()
    if comm is None:
        return
    rank = comm.Get_rank()
    junit_dir = os.environ.get("HVD_BACKUP_JUNIT_DIR")
    if junit_dir:
        os.makedirs(junit_dir, exist_ok=True)
        tag = os.environ.get("HVD_BACKUP_RUN_TAG", f"np{comm.Get_size()}")
        config.option.xmlpath = os.path.join(junit_dir, f"{tag}-rank{rank}.xml")
    if rank > 0:
        config.option.verbose = -1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # At the deadline every thread's stack goes to stderr; five seconds later SIGALRM (default action) ends the
    # process even if a thread holds the GIL, and by then mpirun has forwarded the stacks of every rank.
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=False, file=sys.__stderr__)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(int(TEST_TIMEOUT) + 5)
    yield
    signal.alarm(0)
    faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    comm = world()
    if comm is None or comm.Get_size() == 1:
        return
    report = outcome.get_result()
    failed = comm.allgather(bool(report.failed))
    if report.passed and any(failed):
        report.outcome = "failed"
        report.longrepr = f"{call.when} failed on rank(s) {[r for r, f in enumerate(failed) if f]}"


def pytest_sessionfinish(session, exitstatus):
    comm = world()
    if comm is not None and comm.Get_size() > 1:
        comm.Barrier()  # finalize together: a rank leaving early makes UCX report timeouts on its peers' way out
