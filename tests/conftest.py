"""Test set-up shared by every suite.

* A deadline per test: ``@pytest.mark.deadline(seconds)``, else ``HVD_BACKUP_TEST_TIMEOUT`` (default 180).
  Every wait inside a test is bounded below its deadline. At the deadline every thread's stack goes to stderr.
  A single process then fails the test with an exception in its main thread, so its fixtures still clean up
  (local Slurm daemons, jobs started in the background); if it is stuck where no exception can reach it, or the
  clean-up itself hangs, ``faulthandler`` dumps the stacks again and ends it ``HARD_GRACE`` seconds later. A
  rank of an MPI job (tests/mpi) ends five seconds after the deadline: its peers could not follow it out of
  a collective.
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
HARD_GRACE = 30.0
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def world():
    """``MPI.COMM_WORLD`` when this process is a rank of an MPI job, else ``None`` (MPI not initialised)."""
    if not any(name in os.environ for name in _MPI_ENV):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


_VERDICTS = []  # a duplicate of the world for the verdict exchange, made collectively in pytest_configure


def verdicts():
    """The communicator of the verdict exchange: never the tests' own, so that a rank that failed before one of
    the test's collectives cannot pair its verdict with its peers' collective (they wait instead, and the
    deadline shows where)."""
    return _VERDICTS[0] if _VERDICTS else None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "deadline(seconds): this test's deadline (default HVD_BACKUP_TEST_TIMEOUT)")
    comm = world()
    if comm is None:
        return
    _VERDICTS.append(comm.Dup())
    rank = comm.Get_rank()
    junit_dir = os.environ.get("HVD_BACKUP_JUNIT_DIR")
    if junit_dir:
        os.makedirs(junit_dir, exist_ok=True)
        tag = os.environ.get("HVD_BACKUP_RUN_TAG", f"np{comm.Get_size()}")
        config.option.xmlpath = os.path.join(junit_dir, f"{tag}-rank{rank}.xml")
    if rank > 0:
        config.option.verbose = -1


def deadline_of(item) -> float:
    marker = item.get_closest_marker("deadline")
    return float(marker.args[0]) if marker else TEST_TIMEOUT


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    deadline = deadline_of(item)
    comm = world()
    if comm is not None and comm.Get_size() > 1:
        # On every rank of an MPI job: the stacks at the deadline, and five seconds later SIGALRM (default
        # action) ends the process even if a thread holds the GIL; by then mpirun has forwarded every rank's
        # stacks. (No exception: ranks failing at different points of a collective would only hang each other.)
        faulthandler.dump_traceback_later(deadline, exit=False, file=sys.__stderr__)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(deadline) + 5)
    else:
        def expired(signum, frame):
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
            pytest.fail(f"{item.nodeid} passed its deadline of {deadline:g}s (stacks above)", pytrace=True)

        # The hard end first, in faulthandler's own thread: it works even while the main thread is blocked in C
        # code holding the GIL, where the SIGALRM handler (Python) cannot run.
        faulthandler.dump_traceback_later(deadline + HARD_GRACE, exit=True, file=sys.__stderr__)
        signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, deadline)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _end_background_jobs():
    """Jobs a test started in the background end with it, whether it passed, failed or ran out of time."""
    yield
    helpers = sys.modules.get("tests.e2e.helpers")
    if helpers is not None:
        helpers.end_background_jobs()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    comm = verdicts()
    if comm is None or comm.Get_size() == 1:
        return
    report = outcome.get_result()
    failed = comm.allgather(bool(report.failed))
    if report.passed and any(failed):
        report.outcome = "failed"
        report.longrepr = f"{call.when} failed on rank(s) {[r for r, f in enumerate(failed) if f]}"


def pytest_sessionfinish(session, exitstatus):
    comm = verdicts()
    if comm is not None and comm.Get_size() > 1:
        comm.Barrier()  # finalize together: a rank leaving early makes UCX report timeouts on its peers' way out
