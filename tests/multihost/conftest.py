"""Emulated hosts (``mpi_tools.hosts``) for the whole session, made here and removed afterwards with everything
that still runs on them: h1 and h2 run the jobs, h3 is the head node of the Slurm tests. Each test that uses
``hosts`` starts from healthy links and empty hosts.

Every job gets a deadline shorter than the per-test one of tests/conftest.py, whose alarm would end this process
without removing the hosts; sets left by such a crash (their creator's PID is gone) are removed on start."""

import os
import re
import shutil
import subprocess

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
    with Hosts(3, prefix=f"{PREFIX}{os.getpid()}") as made:
        yield made


@pytest.fixture
def hosts(cluster):
    yield cluster
    for host in cluster.hosts:
        cluster.restore(host)
        cluster.unlimit(host)
        cluster.kill_all(host)
