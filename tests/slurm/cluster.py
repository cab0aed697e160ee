"""A real one-node Slurm for the tests: Debian's slurm-wlm and munge, a configuration in a temporary folder,
munged, slurmctld and slurmd started here and stopped by PID.

Four nodes, ``n[1-4]``, each with its own slurmd on this machine (``slurmd -N``), each declaring a full-size
GPU node (96 CPUs, 8 GPUs as a GRES backed by dummy files; ``SlurmdParameters=config_overrides`` makes Slurm
believe the configuration): ``sbatch --test-only`` checks the templates' full-size directives, and tiny jobs
really run, on one or several "nodes", all on this machine.

Given emulated hosts (:mod:`mpi_tools.hosts`), the nodes are those hosts instead, each slurmd on its own
(NodeName, NodeHostname and NodeAddr are the host's), and slurmctld and the commands run on a head host.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

PACKAGES = ("slurm-wlm", "munge")


def ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("Slurm is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, stdout=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """Start with :meth:`start`, submit with :meth:`sbatch`, stop with :meth:`stop` (PIDs we started only)."""

    def __init__(self, root: str, nodes=None, head=None):
        """``nodes`` and ``head``: emulated hosts (``mpi_tools.hosts.Host``) for the slurmds and the controller;
        by default four nodes on this machine."""
        self.root = root
        self.host = head.name if head else socket.gethostname().split(".")[0]
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.pids: dict[str, int] = {}
        self.nodes = {h.name: h for h in nodes} if nodes else dict.fromkeys(f"n{i}" for i in range(1, 5))
        self.head = head

    def _on(self, node) -> list[str]:
        """The command prefix that runs a program on ``node`` (an emulated host) or here."""
        return node.enter() if node is not None else []

    def write_config(self) -> None:
        r = self.root
        for node in self.nodes:
            os.makedirs(os.path.join(r, "spool", node), exist_ok=True)
            os.makedirs(os.path.join(r, "tmp", node), exist_ok=True)
        os.makedirs(os.path.join(r, "state"), exist_ok=True)
        for i in range(8):
            open(os.path.join(r, f"gpu{i}"), "a").close()
        port = _free_port()
        nodes = "".join(
            f"NodeName={name} NodeHostname={host.name if host else self.host} "
            f"NodeAddr={host.address if host else '127.0.0.1'} Port={_free_port()} CPUs=96 "
            f"RealMemory=500000 Gres=gpu:8\n" for name, host in self.nodes.items())
        controller = f"{self.host}({self.head.address})" if self.head else self.host
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=hvdbackup
SlurmctldHost={controller}
SlurmUser=root
SlurmctldPort={port}
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
TmpFS={r}/tmp/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
JobRequeue=1
ReturnToService=2
# A requeued job may start again once its old credential expired (cred_expire above): the schedulers look every
# second (by default every 60 and 30 s, which made a requeue take 26 s instead of 11).
SchedulerParameters=sched_interval=1,bf_interval=1
{nodes}PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        with open(os.path.join(r, "gres.conf"), "w") as f:
            f.write(f"Name=gpu File={r}/gpu[0-7]\n")

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.root, f"{name}.out"), "w")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids[name] = proc.pid

    def start(self, timeout: float = 60) -> None:
        ensure_installed()
        self.write_config()
        if subprocess.run(["pgrep", "-x", "munged"], stdout=subprocess.DEVNULL).returncode != 0:
            os.makedirs("/run/munge", exist_ok=True)
            self._daemon("munged", ["munged", "--foreground", "--force"])
        self._daemon("slurmctld", self._on(self.head) + ["slurmctld", "-D", "-f", self.conf])
        for name, host in self.nodes.items():
            self._daemon(f"slurmd-{name}", self._on(host) + ["slurmd", "-D", "-N", name, "-f", self.conf])
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            states = self.run(["sinfo", "-h", "-o", "%T %D"]).stdout.strip()
            if states == f"idle {len(self.nodes)}":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the local Slurm nodes did not become idle ({states!r}); see {self.root}/*.log")

    def stop(self) -> None:
        """Cancel every job still on this cluster and wait (up to 30 s) for its processes to end, then stop the
        daemons we started."""
        if "slurmctld" in self.pids:
            try:
                jobs = self.run(["squeue", "-h", "-o", "%i"], timeout=10).stdout.split()
                if jobs:
                    self.run(["scancel", *jobs], timeout=10)
                    for _ in range(60):
                        if not self.run(["squeue", "-h", "-o", "%i"], timeout=10).stdout.split():
                            break
                        time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass  # a controller that does not answer: the daemons go anyway
        for name in sorted(self.pids, key=lambda n: n == "munged"):  # daemons first, munged last
            pid = self.pids[name]
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    time.sleep(0.1)
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                else:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.pids.clear()

    def run(self, argv: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm command (on the head host, when there is one)."""
        return subprocess.run(self._on(self.head) + argv, env={**self.env, **kw.pop("env", {})},
                              capture_output=True, text=True, timeout=timeout, **kw)
