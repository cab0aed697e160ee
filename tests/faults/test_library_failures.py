"""The protocol's failure paths in a user's own loop (``tests/faults/user_loop.py``, no trainer), on 2 and 4
ranks, with and without shared memory, the victim being rank 0 (the counter's host) or the last rank.

What docs/PROTOCOL.md (step 7) and docs/RELIABILITY.md promise: a rank that freezes or dies makes every live
rank fail within ``hang_timeout`` (plus the diagnosis) with an error that names it (or, when the counter's host
is frozen and one-sided operations go over TCP, says that rank 0 did not answer), and the job ends. The jobs
are independent, so they run a few at a time; each is watched line by line, so the tests know when each rank
printed what.
"""

import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from mpi_tools.launch import finish
from tests.e2e.helpers import ROOT, background, own_session

HANG = 4.0  # hang_timeout of the runs
# After hang_timeout: up to 15 s of diagnosis when the counter's host does not answer, then the abort's grace.
GRACE = 20.0
RAISE_WINDOW = 15.0  # an exception on one rank: every other rank must know within this many seconds
STARTUP = 150.0  # the longest a job may take to reach the victim's step (four jobs start at once on two cores)
# All jobs run at once in the first test's set-up, each for at most STARTUP + its window.
pytestmark = pytest.mark.deadline(STARTUP + HANG + GRACE + 40)
PROGRAM = [sys.executable, os.path.join(ROOT, "tests", "faults", "user_loop.py")]
KEEP_GOING = ("--mca", "orte_abort_on_non_zero_status", "0")  # like srun: the launcher does not end the job


@dataclass(frozen=True)
class Case:
    np: int
    shm: bool
    victim: int
    fault: str

    def __str__(self):
        return f"np{self.np}-{'shm' if self.shm else 'noshm'}-victim{self.victim}-{self.fault}"


@dataclass
class Outcome:
    lines: list  # (seconds since the job started, line)
    fault_at: float | None  # when the victim printed that it reached its step
    code: int | None  # the job's exit code; None: still running at the end of the window (killed by the test)
    ended_at: float | None

    def log(self) -> str:
        return "\n".join(f"{t:7.2f}s {line}" for t, line in self.lines)

    def first(self, pattern: str) -> dict[int, tuple[float, str]]:
        """{rank: (time, line)} of the first line per rank matching ``pattern`` (a regex with a group for the
        rank)."""
        found = {}
        for t, line in self.lines:
            m = re.search(pattern, line)
            if m and int(m.group(1)) not in found:
                found[int(m.group(1))] = (t, line)
        return found


def watch(case: Case, log_path, window: float, hang_timeout: float) -> Outcome:
    """Run ``user_loop.py`` for ``case``; follow its output until the job ends or ``window`` seconds after the
    victim's fault; then end whatever is left of it."""
    options = KEEP_GOING if case.fault == "kill" else ()
    args = ["--victim", str(case.victim), "--fault", case.fault, "--hang-timeout", str(hang_timeout)]
    start = time.monotonic()
    with own_session() as session:  # the cases start at the same moment
        proc = background(case.np, args, log_path, options=options, shm=case.shm, program=PROGRAM, env=session)
        lines, fault_at, ended_at, partial = [], None, None, ""
        with open(log_path) as log:
            while True:
                now = time.monotonic() - start
                if proc.poll() is not None:
                    ended_at = now
                *complete, partial = (partial + log.read()).split("\n")
                for line in complete:
                    lines.append((now, line))
                    if fault_at is None and f"rank {case.victim}: at step" in line:
                        fault_at = now
                if ended_at is not None:
                    break
                if (fault_at is None and now > STARTUP) or (fault_at is not None and now > fault_at + window):
                    break
                time.sleep(0.05)
        finish(proc, 0)  # whatever is left of it (a frozen rank outlives mpirun)
    return Outcome(lines + [(now, partial)], fault_at, None if ended_at is None else proc.returncode, ended_at)


# Each of 2 and 4 ranks, with and without shared memory, rank 0 (the counter's host) and another rank as the
# victim, in as few jobs as cover them (tests/faults/test_faults.py freezes and kills rank 2 of the trainer,
# tests/conformance/jobs has the last rank raise and freeze): all of them run at once.
CASES = [Case(2, False, 0, "freeze"), Case(4, True, 0, "freeze"), Case(4, False, 3, "freeze"),
         Case(4, True, 0, "kill"), Case(4, False, 0, "raise")]

# Found by these tests, intermittent on this loaded 2-core machine (so not strict):
# * without shared memory, the first rank to fail takes the job down (MPI_Abort) before slower ranks, which
#   wait for rank 0's answers, print their own error.
# (Fixed: without shared memory, when rank 0 freezes, a live rank's communication thread could block in
# ArrivalCounter.peek between steps, before it took its rank's next gradient, where no watchdog looked: the job
# hung; the watchdog now times a step from the training thread's hand-in. And a rank whose step began before the victim froze diagnosed before the victim's heartbeat was stale and
# said "ranks [] did not contribute"; the shared-memory freeze below is strict about every rank.)
NOT_EVERY_RANK = pytest.mark.xfail(strict=False, reason=(
    "intermittent, without shared memory: a rank can be aborted by the first rank's MPI_Abort before it reports "
    "(a rank that found a hang now lingers for the others' verdict first: passed in the last runs)"))


def cases(group, *marks_for):
    """``group`` as pytest params; ``marks_for`` pairs (predicate, mark) mark the cases they select."""
    return [pytest.param(c, id=str(c), marks=[m for pred, m in marks_for if pred(c)]) for c in group]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("library-failures")

    def one(case):
        if case.fault == "raise":
            # hang_timeout out of the way: a failed rank must be reported within seconds, not after a hang.
            return case, watch(case, root / f"{case}.log", RAISE_WINDOW, hang_timeout=60)
        return case, watch(case, root / f"{case}.log", HANG + GRACE, hang_timeout=HANG)

    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        return dict(pool.map(one, CASES))


def expected_error(case: Case) -> str:
    """What every live rank must say. With shared memory every rank reads the others' progress marks and
    heartbeats and names the victim alone. Over TCP reading them needs rank 0's progress, and ranks that gave up
    (and left) before others read them stop beating: the error may name live ranks beside the victim, or say
    that rank 0 did not answer (docs/RELIABILITY.md, "Limits")."""
    if case.shm:
        return rf"ranks \[{case.victim}\] did not contribute within hang_timeout={HANG:g}s"
    return (rf"ranks \[([\d, ]*\b)?{case.victim}(\b[\d, ]*)?\] did not contribute within hang_timeout={HANG:g}s"
            r"|the counter host rank 0\b.*(did not answer|may be stuck)")


def check_live_ranks(case: Case, outcome: Outcome, pattern: str, within: float, *, every: bool = True):
    """Every rank but the victim (with ``every=False``: at least one, and every one that reported) printed an
    error matching ``pattern`` within ``within`` s of the fault."""
    log = outcome.log()
    assert outcome.fault_at is not None, f"the victim never reached its step:\n{log}"
    errors = outcome.first(r"hvd_backup: rank (\d+): (?:step \d+: )?(.*)")
    assert set(errors) - {case.victim}, f"no live rank reported an error:\n{log}"
    for rank in range(case.np):
        if rank == case.victim or (rank not in errors and not every):
            continue
        assert rank in errors, f"rank {rank} reported no error:\n{log}"
        t, line = errors[rank]
        assert re.search(pattern, line), f"rank {rank}: {line!r} does not match {pattern!r}:\n{log}"
        assert t - outcome.fault_at < within, f"rank {rank} took {t - outcome.fault_at:.1f}s:\n{log}"


def check_ended(outcome: Outcome, within: float):
    log = outcome.log()
    assert outcome.ended_at is not None, f"the job was still running {within:g}s after the fault:\n{log}"
    assert outcome.code not in (0, None), f"the job exited with {outcome.code}:\n{log}"
    assert outcome.ended_at - outcome.fault_at < within, log


HUNG = [c for c in CASES if c.fault != "raise"]


@pytest.mark.parametrize("case", cases(HUNG))
def test_a_failed_rank_is_named_and_the_job_ends(outcomes, case):
    check_live_ranks(case, outcomes[case], expected_error(case), HANG + GRACE, every=False)
    check_ended(outcomes[case], HANG + GRACE)


@pytest.mark.parametrize("case", cases(HUNG, (lambda c: c.fault == "freeze" and not c.shm, NOT_EVERY_RANK)))
def test_every_live_rank_names_the_failed_rank(outcomes, case):
    check_live_ranks(case, outcomes[case], expected_error(case), HANG + GRACE)


@pytest.mark.parametrize("case", cases([c for c in CASES if c.fault == "raise"]))
def test_an_exception_on_one_rank_is_reported_to_every_other_rank(outcomes, case):
    check_live_ranks(case, outcomes[case], rf"rank {case.victim} failed: RuntimeError", RAISE_WINDOW)
    check_ended(outcomes[case], RAISE_WINDOW)
