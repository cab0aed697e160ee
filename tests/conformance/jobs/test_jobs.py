"""The failure idioms, each a whole job (``script.py`` under mpirun): one rank raises, one rank freezes, one rank
works alone after the loop. Launched as srun does by default, without killing the job when one rank exits
(``orte_abort_on_non_zero_status 0``), so that the library, not the launcher, must end it. mpirun then exits 0
whatever its ranks did: each rank's exit status is printed by a shell around it, and every line is tagged with
its rank."""

import os
import re
import sys
import time

import pytest

from mpi_tools.launch import finish, start
from tests.e2e.helpers import ROOT, own_session

SRUN_LIKE = ("--mca", "orte_abort_on_non_zero_status", "0", "--tag-output")
STARTUP_S = 120  # from mpirun to the event, on a loaded 2-core machine


def run(tmp_path, np_, case, *, within, **options):
    """Start ``script.py --case case`` on ``np_`` ranks; wait for its event, then up to ``within`` seconds for
    the job to end. Returns (exit code, seconds from the event to the end, {rank: its output lines})."""
    argv = [sys.executable, "-m", "tests.conformance.jobs.script", "--case", case]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    wrapped = ["sh", "-c", '"$@"; code=$?; echo "EXIT $code"; exit $code', "sh", *argv]
    log = tmp_path / "log"
    # A session directory of its own: the previous case's mpirun may still be removing the shared one.
    with own_session() as session, open(log, "w") as out:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **session)
        proc = start(np_, wrapped, env=env, cwd=ROOT, options=SRUN_LIKE, output=out)
        deadline = time.monotonic() + STARTUP_S
        while "EVENT" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        code = finish(proc, within + 5)
    ended = time.time()
    text = log.read_text()
    found = re.search(r"EVENT \w+ ([\d.]+)", text)
    assert found, f"no event within {STARTUP_S}s:\n{text}"
    print(text)  # shown when the test fails
    return code, ended - float(found.group(1)), by_rank(text, np_)


def by_rank(text, np_):
    """{rank: its output lines}: mpirun tags every piece a rank writes, and pieces of ranks interleave."""
    pieces = {r: [] for r in range(np_)}
    parts = re.split(r"\[\d+,(\d+)\]<std(?:out|err)>:", text)
    for rank, piece in zip(parts[1::2], parts[2::2]):
        pieces[int(rank)].append(piece)
    return {rank: "".join(p).splitlines() for rank, p in pieces.items()}


def exits(lines):
    """Each rank's exit status as printed by the shell around it (absent: killed, e.g. by MPI_Abort)."""
    out = {}
    for rank, rank_lines in lines.items():
        codes = [int(m.group(1)) for m in map(re.compile(r"EXIT (\d+)").fullmatch, rank_lines) if m]
        if codes:
            out[rank] = codes[-1]
    return out


@pytest.mark.parametrize("np_,b", [(2, 0), (4, 1)], ids=["np2-b0", "np4-b1"])
def test_an_exception_on_one_rank_ends_every_rank_within_seconds(tmp_path, np_, b):
    victim = np_ - 1
    code, took, lines = run(tmp_path, np_, "raise", within=20, backup_workers=b, hang_timeout=60)
    assert code != 124 and took < 20, f"the job was still running {took:.0f}s after the exception (hang_timeout=60)"
    assert 0 not in exits(lines).values(), f"a rank exited 0: {exits(lines)}"
    mine = "\n".join(lines[victim])
    assert "Traceback (most recent call last)" in mine and "ValueError: bad sample in batch" in mine, mine
    for rank in range(np_):
        if rank != victim:
            theirs = "\n".join(lines[rank])
            assert re.search(rf"RankFailedError: .*\branks? \[?{victim}\b", theirs), f"rank {rank}:\n{theirs}"


def test_a_failure_on_a_given_communicator_aborts_through_it(tmp_path):
    """Two independent jobs on ``comm=`` halves of the world; rank 1 of the second pair (world rank 3) raises.
    Its pair names it by its rank in the communicator the user gave, and the library aborts through that
    communicator, not ``MPI.COMM_WORLD`` (Open MPI 4 then ends the whole job all the same, as it documents)."""
    code, took, lines = run(tmp_path, 4, "raise", within=60, backup_workers=0, hang_timeout=60, pairs=True)
    assert code != 124, f"the job was still running {took:.0f}s after the exception"
    assert exits(lines).get(2, 1) != 0 and exits(lines).get(3, 1) != 0, f"exits {exits(lines)}"
    assert re.search(r"RankFailedError: .*\brank 1\b", "\n".join(lines[2])), "\n".join(lines[2])
    ending = [line for rank in (2, 3) for line in lines[rank] if "ending the job" in line]
    assert ending and all("MPI_Abort on a communicator of 2 ranks" in line for line in ending), ending


def test_mpi_without_thread_multiple_is_a_clear_error_on_every_rank(tmp_path):
    """MPI initialised below MPI_THREAD_MULTIPLE (mpi4py's rc setting) ends every rank with a one-line error
    that names the level, instead of a crash inside MPI later."""
    env = dict(os.environ, PYTHONPATH=ROOT, MPI4PY_RC_THREAD_LEVEL="serialized")
    argv = [sys.executable, "-m", "tests.conformance.jobs.script", "--case", "raise"]
    log = tmp_path / "log"
    with open(log, "w") as out:
        code = finish(start(2, argv, env=env, cwd=ROOT, options=("--tag-output",), output=out), 60)
    lines = by_rank(log.read_text(), 2)
    assert code not in (0, 124), code
    for rank in (0, 1):
        assert any("MPI_THREAD_SERIALIZED" in line and "MPI_THREAD_MULTIPLE" in line for line in lines[rank]), \
            "\n".join(lines[rank])


def test_a_frozen_rank_ends_every_process_after_hang_timeout(tmp_path):
    hang_timeout = 3
    # The margin is the fault suite's: detection (heartbeats, up to 2 beats), the error's way out of the script,
    # and mpirun ending the frozen rank, on a shared 2-core machine.
    code, took, lines = run(tmp_path, 2, "freeze", within=hang_timeout + 30, backup_workers=0,
                            hang_timeout=hang_timeout)
    assert code != 124 and took < hang_timeout + 30, f"the job was still running {took:.0f}s after the freeze"
    assert 0 not in exits(lines).values(), f"a rank exited 0: {exits(lines)}"
    assert any("HangError" in line for line in lines[0]), "\n".join(lines[0])


def test_a_rank_working_alone_after_the_loop_is_not_a_hang(tmp_path):
    hang_timeout = 3
    code, took, lines = run(tmp_path, 2, "alone", within=2 * hang_timeout + 20, backup_workers=1,
                            hang_timeout=hang_timeout)
    assert code != 124 and exits(lines) == {0: 0, 1: 0}, f"exits {exits(lines)}, {took:.0f}s after the rank left"
    digests = {line for rank_lines in lines.values() for line in rank_lines if line.startswith("DIGEST")}
    assert len(digests) == 1, digests
