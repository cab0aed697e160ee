"""Start an MPI job on this machine with a hard deadline: the one place that knows mpirun's flags.

    python -m mpi_tools.launch -np 4 [--no-shm] [--timeout 300] -- python -m mpi4py -m pytest tests/mpi

* ``--oversubscribe`` (more ranks than cores) and, as root, Open MPI's allow-run-as-root variables;
* ``--no-shm`` takes shared memory out of the transports (``btl tcp,self``; one-sided operations through UCX
  over TCP), so one machine exercises the multi-node code paths of one-sided MPI;
* the whole job runs in its own process group and is killed when the deadline passes (exit code 124).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys

__all__ = ["finish", "mpirun_command", "mpirun_env", "rank_pids", "ranks_among", "run", "start"]

TIMED_OUT = 124


def mpirun_command(np: int, argv: list[str], *, shm: bool = True, tag_output: bool = False,
                   options: tuple[str, ...] = (), hosts: str | None = None,
                   wrapper: tuple[str, ...] = ()) -> list[str]:
    """``mpirun`` with this machine's flags; ``options`` are more mpirun options (e.g. ``--mca`` pairs);
    ``hosts`` is Open MPI's ``--host`` list (``a:2,b:2``: two slots on each of hosts a and b); ``wrapper`` is
    a command that mpirun itself runs under (e.g. one entering an emulated host, :mod:`mpi_tools.hosts`)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("mpirun is not on PATH: run `make setup`, or load your cluster's MPI module")
    cmd = [*wrapper, mpirun, "-np", str(np), "--oversubscribe", "--bind-to", "none"]
    if hosts:
        cmd += ["--host", hosts]
    if tag_output:
        cmd.append("--tag-output")
    if not shm:
        cmd += ["--mca", "btl", "tcp,self", "--mca", "osc", "ucx", "-x", "UCX_TLS=tcp,self"]
    return cmd + list(options) + list(argv)


def mpirun_env(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run(np: int, argv: list[str], *, timeout: float, shm: bool = True, tag_output: bool = False,
        env: dict | None = None, capture: bool = False, cwd: str | None = None,
        **placement) -> subprocess.CompletedProcess:
    """Run ``argv`` on ``np`` ranks; kill the whole job after ``timeout`` seconds (returncode 124).
    ``placement``: ``options``, ``hosts`` and ``wrapper`` of :func:`mpirun_command`."""
    cmd = mpirun_command(np, argv, shm=shm, tag_output=tag_output, **placement)
    return run_with_deadline(cmd, timeout=timeout, env=mpirun_env(env), capture=capture, cwd=cwd)


def _session(sid: int) -> list[int]:
    """PIDs of every process in session ``sid`` (mpirun and its ranks: Open MPI gives each rank its own
    process group, but they stay in the session our launcher started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _kill_session(sid: int, sig: int) -> None:
    for pid in _session(sid):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def run_with_deadline(cmd: list[str], *, timeout: float, env: dict | None = None, capture: bool = False,
                      cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill everything in it and return code 124."""
    out = subprocess.PIPE if capture else None
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if capture else None,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid, signal.SIGTERM)
        try:
            stdout, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            _kill_session(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
        _kill_session(proc.pid, signal.SIGKILL)  # ranks that outlived mpirun
        code = TIMED_OUT
        message = f"mpi_tools.launch: killed after the {timeout:g}s deadline: {' '.join(cmd)}"
        if capture:
            stdout = (stdout or "") + message + "\n"
        else:
            print(message, file=sys.stderr, flush=True)
    except BaseException:
        # Interrupted (Ctrl-C, a caller's deadline): the job lives in its own session and would outlive us.
        _kill_session(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, code, stdout, None)


def start(np: int, argv: list[str], *, shm: bool = True, env: dict | None = None, cwd: str | None = None,
          output=None, **placement) -> subprocess.Popen:
    """Start ``argv`` on ``np`` ranks without waiting, in its own session (``finish`` ends it).
    ``placement``: ``options``, ``hosts`` and ``wrapper`` of :func:`mpirun_command`."""
    cmd = mpirun_command(np, argv, shm=shm, **placement)
    return subprocess.Popen(cmd, env=mpirun_env(env), cwd=cwd, stdout=output, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait up to ``timeout`` seconds for a job from :func:`start`; then kill all of it (code 124)."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid, signal.SIGKILL)
        proc.wait()
        code = TIMED_OUT
    _kill_session(proc.pid, signal.SIGKILL)  # e.g. a rank left stopped (SIGSTOP) after mpirun exited
    return code


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """``{rank: pid}`` of a job from :func:`start` (ranks started on this machine in its session)."""
    return ranks_among(_session(proc.pid))


def ranks_among(pids) -> dict[int, int]:
    """``{rank: pid}`` of the MPI ranks among ``pids`` (read from /proc: each rank's ``OMPI_COMM_WORLD_RANK``,
    or ``PMIX_RANK`` when srun started it)."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        rank = env.get(b"OMPI_COMM_WORLD_RANK", env.get(b"PMIX_RANK"))
        if rank is not None:
            found[int(rank)] = pid
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpi_tools.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("-np", "--np", type=int, required=True, help="number of ranks")
    parser.add_argument("--timeout", type=float, default=600.0, help="kill the job after this many seconds")
    parser.add_argument("--no-shm", action="store_true", help="no shared memory: TCP transports only")
    parser.add_argument("--tag-output", action="store_true", help="prefix every output line with its rank")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.np < 1:
        parser.error(f"-np {args.np}: need at least one rank")
    cmd = mpirun_command(args.np, command, shm=not args.no_shm, tag_output=args.tag_output)
    print("+", " ".join(cmd), flush=True)
    return run_with_deadline(cmd, timeout=args.timeout, env=mpirun_env()).returncode


if __name__ == "__main__":
    sys.exit(main())
