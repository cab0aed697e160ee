"""Emulated hosts (``mpi_tools.hosts``) for the whole session, made here and removed afterwards with everything
that still runs on them: h1 and h2 run the jobs, h3 is the head node of the Slurm tests. Each test that uses
``hosts`` starts from healthy links and empty hosts.

Every job gets a deadline shorter than the per-test one of tests/conftest.py, whose alarm ends this process
without running any teardown: a reaper process, which waits for this one to end, then removes the hosts and
everything on them (and finds nothing to do after a normal teardown). Sets left by a crash of both (their
creator's PID is gone) are removed on the next start."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from mpi_tools.hosts import Hosts
from tests.conftest import TEST_TIMEOUT

PREFIX = "mh"  # then the PID of the pytest process that made the hosts
# Every job here: 2 ranks on each of 2 hosts, started by mpirun on h1; one-sided MPI between hosts over UCX.
SPEC = "h1:2,h2:2"
OSC = ("--mca", "osc", "ucx")
JOB_DEADLINE = TEST_TIMEOUT - 20
# Open MPI prints where it put each rank: the proof that both hosts took part.
MAP = ("--display-map",)


def mapped(out: str) -> dict[str, int]:
    """``{host: ranks}`` from mpirun's --display-map."""
    return {host: int(n) for host, n in re.findall(r"Data for node: (\S+)\s+Num slots: \d+\s+Max slots: \d+\s+"
                                                    r"Num procs: (\d+)", out)}


def _remove_orphaned_sets() -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for pid in set(re.findall(rf"^{PREFIX}(\d+)-h\d+", listed, re.M)):
        if not os.path.exists(f"/proc/{pid}"):
            Hosts.attach(f"{PREFIX}{pid}").down()


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nsenter", "unshare", "tc")):
        pytest.skip("emulated hosts need root and iproute2/util-linux (ip, nsenter, unshare, tc)")
    _remove_orphaned_sets()
    prefix = f"{PREFIX}{os.getpid()}"
    # Reads its stdin until this process ends (its end of the pipe closes however it ends), then takes the
    # hosts down; its own session, so that an interrupt of this one does not end it.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    reaper = subprocess.Popen(["sh", "-c", 'cat >/dev/null; exec "$0" -m mpi_tools.hosts down --prefix "$1"',
                               sys.executable, prefix], stdin=subprocess.PIPE, cwd=root,
                              env=dict(os.environ, PYTHONPATH=root), start_new_session=True)
    try:
        with Hosts(3, prefix=prefix) as made:
            yield made
    finally:
        reaper.stdin.close()
        reaper.wait()


@pytest.fixture
def hosts(cluster):
    yield cluster
    for host in cluster.hosts:
        cluster.restore(host)
        cluster.unlimit(host)
        cluster.kill_all(host)
