"""Emulated hosts on this machine: each a network namespace and a UTS namespace (its own hostname, loopback and
address on a bridge this module creates), so ranks on different "hosts" meet over TCP as on a cluster.

    python -m mpi_tools.hosts up -n 2 --prefix demo          # hosts h1, h2 at 10.213.7.1, .2 (needs root)
    python -m mpi_tools.hosts mpirun --prefix demo --host h1:2,h2:2 -- python -m mpi4py.bench helloworld
    python -m mpi_tools.hosts exec --prefix demo h2 -- hostname
    python -m mpi_tools.hosts down --prefix demo             # kills what runs on the hosts, removes them

* Host ``i`` (1-based) is named ``h<i>``, has the address ``<subnet>.<i>`` on its ``eth0`` and runs nothing
  until something is started there. The bridge has no address: the default namespace cannot reach the hosts,
  and two sets of hosts with the same subnet do not see each other.
* :attr:`Hosts.agent` behaves like ``ssh HOST COMMAND`` for these hosts (Open MPI's ``plm_rsh_agent``); the
  same script, named ``ssh``, is in :attr:`Hosts.bin` for launchers that call ``ssh`` (``horovodrun -H``).
  Like ssh it runs the command with the host's login shell and a fresh environment: what ranks need
  (``PYTHONPATH`` ...) must be forwarded (``mpirun -x``), as on a cluster.
* :meth:`Hosts.cut` takes a host's link down (a partition: packets vanish, no connection is reset);
  :meth:`Hosts.limit` caps its rate with ``tbf`` in both directions.
* :meth:`Hosts.down` kills every process left in each host's namespaces before deleting it: a process in a
  deleted network namespace keeps running, cut off from everything.

Everything is named ``<prefix>-...`` (namespaces, links, the state folder ``/run/<prefix>``); the prefix is at
most 10 characters so link names fit Linux's 15. Nothing else on the machine is touched.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from .launch import mpirun_command, mpirun_env, ranks_among, run_with_deadline

__all__ = ["Host", "Hosts", "slots"]

STATE_ROOT = "/run"
DEFAULT_SUBNET = "10.213.7.0/24"
# What a login shell offers: the command that the agent runs sees this and nothing of the caller's environment.
LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Passed to every rank by default: like ssh, the agent gives remote processes a fresh environment.
FORWARD = ("PYTHONPATH", "PYTHONUNBUFFERED")

_AGENT = """#!/bin/sh
# ssh stand-in for the emulated hosts of {state}: [ssh options] HOST [ssh options] COMMAND... runs COMMAND with
# sh -c inside HOST's network and UTS namespaces, in a new session and a fresh login environment (as sshd does).
host=
while [ $# -gt 0 ]; do
  case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;
    -[bcDEeFIiJLlmOopQRSWw]*|-[46AaCfGgKkMNnqsTtVvXxYy]*) shift ;;
    --) shift; break ;;
    *) [ -n "$host" ] && break; host=${{1#*@}}; shift ;;
  esac
done
[ -n "$host" ] || {{ echo "usage: ssh HOST COMMAND" >&2; exit 255; }}
case "$host" in
{cases}
  *) echo "ssh: $host: not one of the emulated hosts of {state}" >&2; exit 255 ;;
esac
[ $# -gt 0 ] || {{ echo "ssh: $host: no command (no interactive logins on emulated hosts)" >&2; exit 255; }}
cd "${{HOME:-/}}" 2>/dev/null || cd /
exec setsid -w nsenter --net=/run/netns/$ns --uts={state}/$ns.uts -- \\
  env -i HOME="${{HOME:-/root}}" USER="$(id -un)" LOGNAME="$(id -un)" SHELL=/bin/sh PATH={path} \\
  /bin/sh -c "$*"
"""


@dataclass(frozen=True)
class Host:
    """One emulated host: ``name`` is its hostname, ``address`` its IPv4 address on the bridge."""

    name: str
    address: str
    netns: str  # also names the bridge-side end of its link
    state: str  # the folder that holds its UTS namespace (``<netns>.uts``)

    def enter(self) -> list[str]:
        """A command prefix that runs a program on this host (keeping the caller's environment)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--uts={self.state}/{self.netns}.uts", "--"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


class Hosts:
    """``n`` emulated hosts: :meth:`up` creates them, :meth:`down` removes them and everything that runs there
    (also a context manager). Needs root. ``prefix`` names everything created; ``subnet`` (IPv4, at least
    ``n + 1`` addresses) lives only on this set's bridge."""

    def __init__(self, n: int, *, prefix: str | None = None, subnet: str = DEFAULT_SUBNET):
        prefix = prefix or f"hvd{os.getpid()}"
        if not 1 <= len(prefix) <= 10 or not prefix.replace("-", "").isalnum():
            raise ValueError(f"prefix {prefix!r}: 1 to 10 letters, digits or '-' (link names have 15 characters)")
        net = ipaddress.ip_network(subnet)
        if net.num_addresses < n + 2:
            raise ValueError(f"subnet {subnet} is too small for {n} hosts and its own network address")
        self.prefix = prefix
        self.subnet = str(net)
        self.state = os.path.join(STATE_ROOT, prefix)
        self.bridge = f"{prefix}-br"
        self.hosts = [Host(f"h{i}", str(net.network_address + i), f"{prefix}-h{i}", self.state)
                      for i in range(1, n + 1)]

    # --- the hosts -------------------------------------------------------------------------------------------

    @property
    def agent(self) -> str:
        """Path of the ``ssh HOST COMMAND`` stand-in (give it to ``mpirun --mca plm_rsh_agent``)."""
        return os.path.join(self.state, "agent")

    @property
    def bin(self) -> str:
        """A folder holding ``ssh`` (the agent): put it first on ``PATH`` for launchers that call ssh."""
        return os.path.join(self.state, "bin")

    def __getitem__(self, name: str) -> Host:
        for host in self.hosts:
            if name in (host.name, host.address):
                return host
        raise KeyError(f"{name!r} is not one of the hosts {[h.name for h in self.hosts]}")

    def __enter__(self) -> Hosts:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Hosts:
        """Create the bridge, the hosts and their links, and the agent. Removes a half-made set on failure."""
        if os.geteuid() != 0:
            raise PermissionError("emulated hosts need root (network namespaces, links on a bridge)")
        missing = [tool for tool in ("ip", "tc", "nsenter", "unshare", "setsid") if not shutil.which(tool)]
        if missing:
            raise FileNotFoundError(f"emulated hosts need {', '.join(missing)} (iproute2 and util-linux)")
        if os.path.exists(self.state) or _ip("link", "show", self.bridge, check=False).returncode == 0:
            raise FileExistsError(f"hosts with prefix {self.prefix!r} exist already: "
                                  f"`python -m mpi_tools.hosts down --prefix {self.prefix}` removes them")
        try:
            os.makedirs(self.bin)
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            length = ipaddress.ip_network(self.subnet).prefixlen
            for host in self.hosts:
                _ip("netns", "add", host.netns)
                _ip("link", "add", host.netns, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                _ip("link", "set", host.netns, "master", self.bridge, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/{length}", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
                uts = os.path.join(self.state, f"{host.netns}.uts")
                open(uts, "w").close()
                # A persistent UTS namespace (bind-mounted on the file) that holds the host's name.
                subprocess.run(["unshare", f"--uts={uts}", "hostname", host.name], check=True)
            self._write_agent()
            with open(os.path.join(self.state, "hosts.json"), "w") as f:
                json.dump({"subnet": self.subnet, "hosts": [asdict(h) for h in self.hosts]}, f)
        except BaseException:
            self.down()
            raise
        return self

    def _write_agent(self) -> None:
        cases = "\n".join(f"  {h.name}|{h.address}) ns={h.netns} ;;" for h in self.hosts)
        with open(self.agent, "w") as f:
            f.write(_AGENT.format(state=self.state, cases=cases, path=LOGIN_PATH))
        os.chmod(self.agent, 0o755)
        os.symlink(self.agent, os.path.join(self.bin, "ssh"))

    @classmethod
    def attach(cls, prefix: str) -> Hosts:
        """The hosts that ``up`` created under ``prefix`` (e.g. by another process); when ``up`` did not get as
        far as saving them, those whose namespaces exist (enough to take them down)."""
        try:
            with open(os.path.join(STATE_ROOT, prefix, "hosts.json")) as f:
                saved = json.load(f)
        except FileNotFoundError:
            listed = _ip("netns", "list", check=False).stdout.split()
            n = max((int(name.rsplit("-h", 1)[1]) for name in listed
                     if name.startswith(f"{prefix}-h") and name.rsplit("-h", 1)[1].isdigit()), default=0)
            return cls(n, prefix=prefix)
        hosts = cls(len(saved["hosts"]), prefix=prefix, subnet=saved["subnet"])
        hosts.hosts = [Host(**h) for h in saved["hosts"]]
        return hosts

    def pids(self, host: Host | str) -> list[int]:
        """Processes running on ``host`` (in its network namespace)."""
        out = _ip("netns", "pids", self._host(host).netns, check=False).stdout
        return [int(p) for p in out.split()]

    def running(self) -> dict[str, list[str]]:
        """``{host: ["PID command line", ...]}`` for every host where something runs."""
        found = {}
        for host in self.hosts:
            lines = []
            for pid in self.pids(host):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    lines.append(f"{pid} {argv}")
                except OSError:
                    continue
            if lines:
                found[host.name] = lines
        return found

    def kill_all(self, host: Host | str, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process on ``host`` until none is left (all of a node lost at once); returns the PIDs."""
        host = self._host(host)
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while pids := self.pids(host):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host.name}: processes {pids} survive SIGKILL")
            time.sleep(0.05)
        return sorted(set(killed))

    def down(self) -> None:
        """Kill everything on the hosts, then remove them, their links, the bridge and the state folder.
        Safe to call on a set that is half made or already gone."""
        listed = _ip("netns", "list", check=False).stdout.split()
        for host in self.hosts:
            if host.netns in listed:
                self.kill_all(host)
            # Its link goes now: the namespace itself can outlive its name while the kernel still retransmits
            # on sockets that its killed processes left behind.
            _ip("link", "delete", host.netns, check=False)
            if host.netns in listed:
                _ip("netns", "delete", host.netns, check=False)
            uts = os.path.join(self.state, f"{host.netns}.uts")
            if os.path.ismount(uts):
                subprocess.run(["umount", uts], check=False)
        _ip("link", "delete", self.bridge, check=False)
        if os.path.isdir(self.state):
            for name in ("bin/ssh", "agent", "hosts.json", *(f"{h.netns}.uts" for h in self.hosts)):
                path = os.path.join(self.state, name)
                if os.path.lexists(path) and not os.path.ismount(path):
                    os.remove(path)
            for folder in (self.bin, self.state):
                if os.path.isdir(folder):
                    os.rmdir(folder)

    # --- faults ----------------------------------------------------------------------------------------------

    def cut(self, host: Host | str) -> None:
        """Take ``host``'s link down: from now on its packets are lost in both directions (nothing is reset)."""
        _ip("link", "set", self._host(host).netns, "down")

    def restore(self, host: Host | str) -> None:
        """Bring ``host``'s link back up. Forgets every host's neighbour entries: those that failed while the link
        was down would refuse new connections at once ("No route to host") for a while."""
        _ip("link", "set", self._host(host).netns, "up")
        for each in self.hosts:
            _ip("-n", each.netns, "neigh", "flush", "all", check=False)

    def limit(self, host: Host | str, rate: str, *, burst: str = "32kb", latency: str = "200ms") -> None:
        """Cap ``host``'s link at ``rate`` (tc's units: ``10mbit``) in both directions with ``tbf``."""
        host = self._host(host)
        spec = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        subprocess.run(["tc", "qdisc", "replace", "dev", host.netns, *spec], check=True)  # traffic to the host
        subprocess.run(host.enter() + ["tc", "qdisc", "replace", "dev", "eth0", *spec], check=True)  # from it

    def unlimit(self, host: Host | str) -> None:
        host = self._host(host)
        subprocess.run(["tc", "qdisc", "del", "dev", host.netns, "root"], check=False, capture_output=True)
        subprocess.run(host.enter() + ["tc", "qdisc", "del", "dev", "eth0", "root"], check=False,
                       capture_output=True)

    def _host(self, host: Host | str) -> Host:
        return self[host] if isinstance(host, str) else host

    # --- launching -------------------------------------------------------------------------------------------

    def mpi_environment(self) -> dict[str, str]:
        """Environment variables for MPI jobs on these hosts, also those that mpirun does not start (``srun``):

        * Open MPI's TCP and out-of-band traffic on the bridge's subnet only;
        * UCX (one-sided MPI with ``osc ucx``) on TCP over eth0: UCX tells machines apart by boot id and would
          otherwise use shared memory between emulated hosts, and carry on through a cut link;
        * idle ranks yield their core: the hosts share this machine's cores, and ranks that spin while they
          wait (what Open MPI does when a host has a core per rank) make every message wait for a time
          slice; 2 ranks on each of 2 hosts on 2 cores took 71 ms per small allreduce instead of 11 ms."""
        return {"OMPI_MCA_btl_tcp_if_include": self.subnet, "OMPI_MCA_oob_tcp_if_include": self.subnet,
                "OMPI_MCA_mpi_yield_when_idle": "1", "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}

    def placement(self, host_spec: str, *, on: str = "h1", forward: tuple[str, ...] = FORWARD,
                  options: tuple[str, ...] = ()) -> dict:
        """Keyword arguments for :func:`mpi_tools.launch.run`/``start``/``mpirun_command`` that place a job on
        these hosts: ``mpirun --host host_spec`` started on host ``on`` (so that every process of the job, mpirun
        included, runs on an emulated host), the agent as ``ssh``, :meth:`mpi_environment` as mpirun options,
        the environment variables ``forward`` passed to every rank, then ``options``."""
        mca = ["--mca", "plm_rsh_agent", self.agent]
        for name, value in self.mpi_environment().items():
            if name.startswith("OMPI_MCA_"):
                mca += ["--mca", name[len("OMPI_MCA_"):], value]
            else:
                mca += ["-x", f"{name}={value}"]
        for name in forward:
            mca += ["-x", name]
        return {"hosts": host_spec, "wrapper": tuple(self[on].enter()), "options": (*mca, *options)}

    def ranks(self) -> dict[int, tuple[str, int]]:
        """``{rank: (host, pid)}`` of the MPI ranks running on the hosts."""
        return {rank: (host.name, pid) for host in self.hosts
                for rank, pid in ranks_among(self.pids(host)).items()}


def slots(host_spec: str) -> int:
    """How many ranks Open MPI's ``--host`` list asks for (``h1:2,h2:2``: 4)."""
    return sum(int(part.split(":")[1]) if ":" in part else 1 for part in host_spec.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpi_tools.hosts", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="create N hosts")
    up.add_argument("-n", type=int, default=2, help="number of hosts")
    up.add_argument("--subnet", default=DEFAULT_SUBNET)
    up.add_argument("--limit", action="append", default=[], metavar="HOST=RATE", help="e.g. h2=10mbit")
    down = sub.add_parser("down", help="kill everything on the hosts and remove them")
    ex = sub.add_parser("exec", help="run a command on one host (keeps this environment)")
    ex.add_argument("host")
    mpi = sub.add_parser("mpirun", help="run mpirun on h1 across the hosts, with a deadline")
    mpi.add_argument("--host", required=True, help="Open MPI's --host, e.g. h1:2,h2:2")
    mpi.add_argument("--timeout", type=float, default=600.0)
    for p in (up, down, ex, mpi):
        p.add_argument("--prefix", required=True, help="names everything made (at most 10 characters)")
    for p in (ex, mpi):
        p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    args = parser.parse_args(argv)
    if args.action == "up":
        hosts = Hosts(args.n, prefix=args.prefix, subnet=args.subnet).up()
        for item in args.limit:
            name, rate = item.split("=", 1)
            hosts.limit(name, rate)
        for host in hosts.hosts:
            print(f"{host.name} {host.address} (netns {host.netns})")
        print(f"agent: {hosts.agent}")
        return 0
    hosts = Hosts.attach(args.prefix)
    if args.action == "down":
        hosts.down()
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.action == "exec":
        return subprocess.run(hosts[args.host].enter() + command).returncode
    cmd = mpirun_command(slots(args.host), command, **hosts.placement(args.host))
    print("+", shlex.join(cmd), flush=True)
    return run_with_deadline(cmd, timeout=args.timeout, env=mpirun_env()).returncode


if __name__ == "__main__":
    sys.exit(main())
