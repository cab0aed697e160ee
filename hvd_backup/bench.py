"""`make bench`: run the benchmarks and experiments, write JSON (and plots) under docs/results/, print tables.

    python -m hvd_backup.bench [--quick] [--only overhead,counter] [--out docs/results]

Every measurement that is compared is taken side by side in one run (same job, interleaved), because this
machine is small and noisy; docs/RESULTS.md explains the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mpi_tools.launch import run

EXPERIMENTS = {}


def experiment(name):
    def register(fn):
        EXPERIMENTS[name] = fn
        return fn

    return register


def _job(np_: int, module: str, args: list[str], *, shm: bool = True, timeout: float = 1800) -> None:
    cmd = [sys.executable, "-m", module, *args]
    print("+ mpirun -np", np_, "" if shm else "(no shared memory)", " ".join(cmd[1:]), flush=True)
    proc = run(np_, cmd, timeout=timeout, shm=shm)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {module} failed with exit code {proc.returncode}")


@experiment("overhead")
def overhead(out: str, quick: bool) -> dict:
    path = os.path.join(out, "overhead.json")
    steps, reps = ("15", "1") if quick else ("60", "5")
    _job(4, "hvd_backup.experiments.overhead", ["--steps", steps, "--reps", reps, "--out", path])
    with open(path) as f:
        result = json.load(f)
    a, b, c = result["a_no_stragglers"], result["b_injected_delays"], result["c_counter_latency"]
    print("\n(a) no stragglers, 4 ranks: ms per step (median of repetitions)")
    print(f"{'model':8s}{'params':>12s}{'horovod':>10s}{'b=0':>10s}{'b=1':>10s}{'b=0/hvd':>9s}{'b=1/hvd':>9s}")
    for size, r in a.items():
        ms = r["ms_per_step"]
        print(f"{size:8s}{r['params']:12,d}{ms['horovod']:10.1f}{ms['b0']:10.1f}{ms['b1']:10.1f}"
              f"{r['ratio_b0']:9.3f}{r['ratio_b1']:9.3f}")
    print("\n(b) injected delays, 4 ranks, b=1: measured time over the zero-overhead ideal")
    print(f"{'straggler model':34s}{'ours/ideal':>11s}{'ours/ideal+step':>16s}{'sync/ours':>10s}{'learn close (us)':>17s}")
    for spec, r in b.items():
        learn = r["straggler_learns_close_us"]
        print(f"{spec:34s}{r['backup_over_ideal']:11.3f}{r['backup_over_ideal_with_step_cost']:16.3f}"
              f"{r['sync_over_backup']:10.2f}{'' if learn is None else f'{learn[0]:.0f} (p90 {learn[1]:.0f})':>17s}")
    print("\n(c) one counter operation from a rank to the host, shared memory (us)")
    for op, r in c.items():
        print(f"{op:8s} median {r['median_us']:7.1f}   p99 {r['p99_us']:7.1f}")
    return result


@experiment("counter-tcp")
def counter_tcp(out: str, quick: bool) -> dict:
    path = os.path.join(out, "counter_tcp.json")
    _job(4, "hvd_backup.experiments.overhead", ["--parts", "c", "--out", path], shm=False)
    with open(path) as f:
        result = json.load(f)
    print("\n(c) one counter operation, no shared memory (TCP, osc ucx) (us)")
    for op, r in result["c_counter_latency"].items():
        print(f"{op:8s} median {r['median_us']:7.1f}   p99 {r['p99_us']:7.1f}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvd_backup.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (few steps, one repetition)")
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help=f"comma-separated: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--out", default="docs/results", help="where JSON and plots go")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in EXPERIMENTS]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    out = os.path.join(args.out, "quick") if args.quick else args.out
    os.makedirs(out, exist_ok=True)
    for name in chosen:
        start = time.monotonic()
        print(f"\n===== {name}", flush=True)
        EXPERIMENTS[name](out, args.quick)
        print(f"({name}: {time.monotonic() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
