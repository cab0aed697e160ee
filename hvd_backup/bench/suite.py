"""`make bench`: run the benchmarks and experiments, write JSON (and plots) under docs/results/, print tables.

    python -m hvd_backup.bench [--quick] [--only overhead,counter] [--out docs/results]

Every measurement that is compared is taken side by side in one run (same job, interleaved), because this
machine is small and noisy; docs/RESULTS.md explains the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from mpi_tools.launch import run

EXPERIMENTS = {}


def experiment(name):
    def register(fn):
        EXPERIMENTS[name] = fn
        return fn

    return register


def _job(np_: int, module: str, args: list[str], *, shm: bool = True, timeout: float = 1800, **placement) -> None:
    """Run ``module`` on ``np_`` ranks; ``placement``: on emulated hosts (:meth:`mpi_tools.hosts.Hosts.placement`)."""
    cmd = [sys.executable, "-m", module, *args]
    where = f"--host {placement['hosts']}" if placement.get("hosts") else f"-np {np_}"
    print("+ mpirun", where, "" if shm else "(no shared memory)", " ".join(cmd[1:]), flush=True)
    proc = run(np_, cmd, timeout=timeout, shm=shm, **placement)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {module} failed with exit code {proc.returncode}")


@experiment("overhead")
def overhead(out: str, quick: bool) -> dict:
    path = os.path.join(out, "overhead.json")
    steps, reps = ("15", "1") if quick else ("60", "5")
    _job(4, "hvd_backup.bench.overhead", ["--steps", steps, "--reps", reps, "--out", path])
    with open(path) as f:
        result = json.load(f)
    a, b, c = result["a_no_stragglers"], result["b_injected_delays"], result["c_counter_latency"]
    _table("(a) no stragglers, 4 ranks: ms per step (median of repetitions)", [8, 12, 10, 10, 10, 9, 9],
           ["model", "params", "horovod", "b=0", "b=1", "b=0/hvd", "b=1/hvd"],
           [[size, f"{r['params']:,d}", *(f"{r['ms_per_step'][k]:.1f}" for k in ("horovod", "b0", "b1")),
             f"{r['ratio_b0']:.3f}", f"{r['ratio_b1']:.3f}"] for size, r in a.items()])
    learn = {spec: r["straggler_learns_close_us"] for spec, r in b.items()}
    _table("(b) injected delays, 4 ranks, b=1: measured time over the zero-overhead ideal (at step() / overlap)",
           [34, 15, 17, 12, 17],
           ["straggler model", "ours/ideal", "ours/ideal+step", "sync/ours", "learn close (us)"],
           [[spec, *(f"{r[k]:.3f} / {r['overlap'][k]:.3f}" if "overlap" in r else f"{r[k]:.3f}"
                     for k in ("backup_over_ideal", "backup_over_ideal_with_step_cost")),
             f"{r['sync_over_backup']:.2f}" + (f" / {r['overlap']['sync_over_backup']:.2f}" if "overlap" in r else ""),
             "" if learn[spec] is None else f"{learn[spec][0]:.0f} (p90 {learn[spec][1]:.0f})"]
            for spec, r in b.items()])
    _table("(c) one counter operation from a rank to the host, shared memory (us)", [8, 16, 14],
           ["op", "median", "p99"], [[op, f"{r['median_us']:.1f}", f"{r['p99_us']:.1f}"] for op, r in c.items()])
    d = result["d_pauses_in_backward"]
    _table(f"(d) 4 ranks, b=1, 6M, {d['spec']}: ms per step by where the pause falls", [10, 12, 12],
           ["pause", "at step()", "overlap"],
           [[where, f"{r['b1']:.1f}", f"{r['b1 ov']:.1f}"] for where, r in d["ms_per_step"].items()])
    return result


def _table(title: str, widths: list[int], head: list[str], rows: list[list[str]]) -> None:
    """Print a table: the first column left-aligned, the others right-aligned, in the given widths."""
    print(f"\n{title}")
    for cells in [head, *rows]:
        print("".join(f"{c:<{w}s}" if i == 0 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(cells, widths))))


def _load(path):
    with open(path) as f:
        return json.load(f)


@experiment("step-time")
def step_time(out: str, quick: bool) -> dict:
    """Step time against b at N = 4 and 8, three straggler models; and the b-planner checked against it."""
    from . import plots
    from ..planning.plan import Workload, predict

    results = {}
    for n in (4, 8):
        traces = os.path.join(out, f"traces-n{n}")
        os.makedirs(traces, exist_ok=True)
        path = os.path.join(out, f"step_time_n{n}.json")
        _job(n, "hvd_backup.bench.step_time", ["--steps", "15" if quick else "60", "--max-b", "3",
                                                      "--out", path, "--traces", traces])
        result = _load(path)
        plots.step_time(result, os.path.join(out, f"step_time_n{n}.png"))
        print(f"\nstep time, {n} ranks (ms per step; ideal in brackets)")
        print(f"{'model':16s}{'horovod':>9s}" + "".join(f"{'b=' + str(b):>15s}" for b in range(4)) + f"{'auto':>10s}")
        for name, row in result["models"].items():
            cells = "".join(f"{row['measured_ms'][f'b{b}']:7.1f} [{row['ideal_ms'][f'b{b}']:5.1f}]" for b in range(4))
            print(f"{name:16s}{row['measured_ms']['horovod']:9.1f}{cells}{row['measured_ms']['auto_steady']:10.1f}"
                  f"  (auto chose b={row['auto_final_b']})")
        # The planner, fed with one run's trace, predicts the step time; compare with what was measured: each b
        # from its own trace, and every b from the b=1 trace (the planner's real job: b not yet tried).
        validation = {}
        for name, row in result["models"].items():
            validation[name] = {}
            one, one_info = Workload.from_trace(row["traces"]["b1"])
            for b in range(4):
                own, own_info = Workload.from_trace(row["traces"][f"b{b}"])
                measured = row["measured_ms"][f"b{b}"]
                self_ms = 1e3 * predict(own, n, b, steps=400, comm_s=own_info["overhead_s"], per_rank=True)
                cross_ms = 1e3 * predict(one, n, b, steps=400, comm_s=one_info["overhead_s"], per_rank=True)
                validation[name][f"b{b}"] = {"measured_ms": measured, "predicted_own_trace_ms": self_ms,
                                             "error": self_ms / measured - 1, "predicted_from_b1_ms": cross_ms,
                                             "error_from_b1": cross_ms / measured - 1}
        result["planner_validation"] = validation
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"planner against measured, {n} ranks: predicted/measured - 1, from the run's own trace "
              "[from the b=1 trace]")
        for name, rows in validation.items():
            print(f"  {name:16s}" + "".join(f"  b={b[1:]}: {v['error']:+6.1%} [{v['error_from_b1']:+6.1%}]"
                                              for b, v in rows.items()))
        results[n] = result
    return results


@experiment("counter")
def counter_cost(out: str, quick: bool) -> list:
    from . import plots

    rows = []
    for shm, transport in ((True, "shm"), (False, "tcp")):
        for n in (2, 4, 8, 16):
            path = os.path.join(out, f"counter_{transport}_n{n}.json")
            _job(n, "hvd_backup.bench.counter_cost", ["--out", path, "--seconds", "0.2" if quick else "1"],
                 shm=shm)
            rows.append(dict(_load(path), transport=transport))
    with open(os.path.join(out, "counter.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plots.counter(rows, os.path.join(out, "counter.png"))
    print(f"\n{'transport':10s}{'N':>4s}{'alone us':>10s}{'contended us':>14s}{'ops/s at host':>15s}")
    for r in rows:
        print(f"{r['transport']:10s}{r['ranks']:4d}{r['alone_median_us']:10.1f}{r['contended_median_us']:14.1f}"
              f"{r['contended_ops_per_s']:15.0f}")
    return rows


@experiment("multihost")
def multihost(out: str, quick: bool) -> dict:
    """Ranks on 2 and 4 emulated hosts, the links between them unlimited and then limited with tbf: step time of
    ours (b = 0, 1, both backends, the hand-in at step() and during backward) against Horovod's optimizer and
    DDP, 1M to 25M parameters. Skipped where hosts cannot be made."""
    from mpi_tools.hosts import Hosts, slots

    rate = "1gbit"
    # (host list, link, sizes, steps, repetitions): a step over the limited link takes up to seconds.
    runs = [("h1:1,h2:1", "unlimited", "1M,6M,25M", 15, 3), ("h1:1,h2:1", rate, "1M,6M,25M", 8, 2),
            ("h1:2,h2:2", "unlimited", "1M,6M", 15, 2), ("h1:2,h2:2", rate, "6M", 8, 2),
            ("h1:1,h2:1,h3:1,h4:1", "unlimited", "6M", 15, 2)]
    if quick:
        runs = [(spec, link, "1M", 3, 1) for spec, link, *_ in runs[:2]]
    try:
        hosts = Hosts(4, prefix=f"bench{os.getpid()}"[:10]).up()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"multihost: skipped, no emulated hosts here: {exc}")
        return {"skipped": str(exc)}
    results = []
    try:
        for spec, link, sizes, steps, reps in runs:
            for host in hosts.hosts:  # every host's link: what leaves a host and what reaches it
                if link == "unlimited":
                    hosts.unlimit(host)
                else:
                    hosts.limit(host, link, burst="256kb")
            path = os.path.join(out, "multihost_run.json")
            # One-sided MPI over UCX between hosts; DDP's gloo on the hosts' interface.
            placement = hosts.placement(spec, options=("--mca", "osc", "ucx", "-x", "GLOO_SOCKET_IFNAME=eth0"))
            _job(slots(spec), "hvd_backup.bench.multihost",
                 ["--steps", str(steps), "--warmup", "2", "--reps", str(reps), "--sizes", sizes, "--out", path,
                  "--master-addr", hosts["h1"].address], timeout=1800, **placement)
            results.append(dict(_load(path), spec=spec, link=link))
            os.remove(path)
    finally:
        hosts.down()
    with open(os.path.join(out, "multihost.json"), "w") as f:
        json.dump({"runs": results}, f, indent=1)
    from .multihost import VARIANTS

    labels = [label for label, *_ in VARIANTS]
    _table("ranks on emulated hosts, no stragglers: ms per step [over Horovod's optimizer]",
           [20, 10, 6, 11, *[16] * len(labels)], ["hosts", "link", "model", "params", *labels],
           [[r["spec"], r["link"], size, f"{x['params']:,d}",
             *(f"{x['ms_per_step'][k]:.1f} [{x['over_horovod'][k]:.2f}]" for k in labels)]
            for r in results for size, x in r["sizes"].items()])
    return results


@experiment("accuracy")
def accuracy(out: str, quick: bool) -> dict:
    from . import plots

    path = os.path.join(out, "accuracy.json")
    cmd = [sys.executable, "-m", "hvd_backup.bench.accuracy", "--out", path] + (["--quick"] if quick else [])
    print("+", " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("bench: the accuracy experiment failed")
    result = _load(path)
    plots.accuracy(result, os.path.join(out, "accuracy.png"))
    print(f"\n{'task':16s}{'mode':14s}{'final top-1 (seeds)':>28s}{'wall s':>9s}{'staleness':>10s}")
    for task, modes in result["tasks"].items():
        for mode, runs in modes.items():
            tops = " ".join(f"{r['final_top1']:.3f}" for r in runs)
            wall = sum(r["wall_s"] for r in runs) / len(runs)
            stale = runs[0]["mean_staleness"]
            print(f"{task:16s}{mode:14s}{tops:>28s}{wall:9.1f}{'' if stale is None else f'{stale:.1f}':>10s}")
    return result


@experiment("scale")
def scale(out: str, quick: bool) -> dict:
    """Sync, backup workers and async on 16 and 64 virtual workers (the quick scale study; the full one is
    ``python -m hvd_backup.bench.scale_study``, see docs/RESULTS.md)."""
    import subprocess

    path = os.path.join(out, "scale_quick.json")
    cmd = [sys.executable, "-m", "hvd_backup.bench.scale_study", "--quick", "--out", path]
    print("+", " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("bench: the scale study failed")
    return _load(path)


@experiment("inclusion")
def inclusion(out: str, quick: bool) -> dict:
    """With overlap: the hand-in at step(), the decision at the first bucket and per bucket, on 16 virtual
    workers (``python -m hvd_backup.bench.inclusion``, see docs/RESULTS.md 10.3)."""
    path = os.path.join(out, "inclusion.json")
    cmd = [sys.executable, "-m", "hvd_backup.bench.inclusion", "--out", path]
    cmd += ["--tasks", "digits", "--epochs", "10"] if quick else []
    print("+", " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("bench: the inclusion study failed")
    return _load(path)


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
