"""The optimizer's own cost, measured side by side in one MPI job (run on every rank under mpirun):

(a) no stragglers: ms per step of hvd_backup with b=0 and b=1 against ``hvd.DistributedOptimizer``, on a model of
    about 1M parameters and one of about 10M, interleaved over repetitions, with where the time goes;
(b) injected delays: measured time for a fixed number of steps against the ideal (a zero-overhead simulation of
    this protocol fed with the same delays and the compute times measured in the run), and plain sync against it;
(c) latency of one fetch-and-op on the counter, and of a straggler learning that its step closed;
(d) pauses inside the backward pass (``--parts d``): b = 1 at ``step()`` and with overlap, each rank's delays
    placed before the forward pass or between its first and its second bucket, where inclusion decided at the
    first bucket makes everyone wait (docs/RESULTS.md 10.3).

    mpirun -np 4 python -m hvd_backup.bench.overhead --out overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

import hvd_backup
from mpi_tools import ArrivalCounter, StragglerInjector

from ..planning.simulate import simulate
from .common import start_horovod_job, time_one_rank

# MLPs by parameter count: input width, hidden widths (10 classes).
SIZES = {"1M": (784, [1024, 256]), "6M": (784, [2048, 2048]), "10M": (1024, [2048, 2048, 2048]),
         "25M": (1024, [4096, 4096, 1024])}
SPECS = ["fixed:delay=0.1,rank=3", "exp:mean=0.02", "lognormal:median=0.01,sigma=1"]


def build(size: str, seed: int = 0):
    inp, hidden = SIZES[size]
    torch.manual_seed(seed)
    layers, width = [], inp
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    g = torch.Generator().manual_seed(1 + MPI.COMM_WORLD.Get_rank())
    return model, torch.randn(32, inp, generator=g), torch.randint(0, 10, (32,), generator=g)


def run(variant: str, size: str, steps: int, hvd, spec: str | None = None, warmup: int = 3,
        trace: str | None = None, auto_max: int | None = None, backend: str = "horovod",
        overlap: bool = False, delay_at: str = "start") -> dict:
    """Train ``steps`` global steps with ``variant`` ("horovod", "ddp", "b0", "b1", ..., "auto"; ours on
    ``backend``, with ``overlap`` or not); rank 0's wall time, this rank's compute times, and (ours) the step
    records; rank 0 writes them to ``trace`` in the trainer's metrics format when given. "ddp" needs
    torch.distributed's default group. The injected delay comes before the forward pass, or with ``delay_at=
    "backward"`` when the backward pass reaches the first layer's output (after the other layers' gradients)."""
    comm = MPI.COMM_WORLD
    model, x, y = build(size)
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ours = variant not in ("horovod", "ddp")
    if variant == "auto":
        opt = hvd_backup.DistributedOptimizer(base, model.named_parameters(), backup_workers="auto", auto_every=10,
                                              max_backup_workers=auto_max, backend=backend, overlap=overlap)
    elif ours:
        opt = hvd_backup.DistributedOptimizer(base, model.named_parameters(), backup_workers=int(variant[1:]),
                                              backend=backend, overlap=overlap)
    elif variant == "ddp":
        model, opt = torch.nn.parallel.DistributedDataParallel(model), base
    else:
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
    injector = StragglerInjector(spec, rank=comm.Get_rank(), size=comm.Get_size(), seed=5)
    loss_fn = torch.nn.CrossEntropyLoss()
    computes: dict[int, float] = {}
    done, last = 0, 0.0
    start = None
    now = {"v": 0}
    if delay_at == "backward":
        def pause(grad):
            injector.sleep(now["v"], last)

        def on_forward(module, inputs, out):
            out.register_hook(pause)  # runs when the backward pass reaches the first layer's output

        model[1].register_forward_hook(on_forward)
    while (opt.global_step if ours else done) < steps + warmup:
        v = opt.global_step if ours else done
        if v >= warmup and start is None:
            comm.Barrier()
            start = time.perf_counter()
            if ours:
                opt.timings(reset=True)
        now["v"] = v
        if delay_at == "start":
            injector.sleep(v, last)  # slow before the gradient exists, as a real straggler is
        tic = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        computes[v] = last = time.perf_counter() - tic
        opt.step()
        done += 1
    elapsed = time.perf_counter() - start
    out = {"seconds": elapsed, "ms_per_step": 1e3 * elapsed / steps, "computes": computes}
    if ours:
        out["timings"] = opt.timings()
        out["records"] = [r for r in opt.pop_records() if r.step >= warmup]
        out["final_b"] = opt.backup_workers
        opt.close()
        if trace and comm.Get_rank() == 0:
            with open(trace, "w") as f:
                for r in out["records"]:
                    f.write(json.dumps({"type": "step", "step": r.step, "size": r.size, "count": r.count,
                                        "quorum": r.quorum, "step_s": r.duration_s,
                                        "compute_s": list(r.compute_s)}) + "\n")
    return out


def part_a(hvd, steps: int, reps: int) -> dict:
    comm = MPI.COMM_WORLD
    results = {}
    for size in ("1M", "10M"):
        per = {v: [] for v in ("horovod", "b0", "b1")}
        where = {}
        for _ in range(reps):
            for variant in per:
                r = run(variant, size, steps, hvd)
                per[variant].append(r["ms_per_step"])
                if variant != "horovod":
                    t = comm.gather(r["timings"], root=0)
                    if comm.Get_rank() == 0:
                        where[variant] = {phase: 1e3 * sum(tt.get(phase, (0, 0))[0] for tt in t) / len(t) / steps
                                          for phase in t[0]}
        med = {v: statistics.median(ms) for v, ms in per.items()}
        results[size] = {
            "params": sum(p.numel() for p in build(size)[0].parameters()),
            "ms_per_step": med, "all_ms": per,
            "ratio_b0": med["b0"] / med["horovod"], "ratio_b1": med["b1"] / med["horovod"],
            "added_ms_b0": med["b0"] - med["horovod"], "added_ms_b1": med["b1"] - med["horovod"],
            "where_ms_per_step": where,
        }
    return results


def part_b(hvd, steps: int) -> dict:
    """Measured time for ``steps`` steps against the simulated ideal, per straggler model, for b = 1 with the
    gradient handed in at ``step()`` and during the backward pass (``overlap``).

    Two ideals: zero overhead (only compute and delays; communication is free, so the same with and without
    overlap), and with the per-step cost that the same variant has without any injected delay (allreduce,
    update, what overlap leaves exposed) added to every step: the second isolates what stragglers cost us.
    """
    comm = MPI.COMM_WORLD
    n, b = comm.Get_size(), 1
    results = {}
    fixed_s = {"b1": 0.0, "b1 ov": 0.0}
    for spec in ["none"] + SPECS:
        measured, ideal, latency = {}, {}, []
        for variant in ("horovod", "b1", "b1 ov"):
            r = run(variant.split()[0], "1M", steps, hvd, spec=spec, warmup=0, overlap=variant.endswith("ov"))
            measured[variant] = r["seconds"]
            computes = comm.gather(r["computes"], root=0)
            if comm.Get_rank() != 0 or variant == "horovod":
                continue
            injector = StragglerInjector(spec, rank=0, size=n, seed=5)
            median = [statistics.median(c.values()) for c in computes]

            def work(rank, v, computes=computes, median=median, injector=injector):
                c = computes[rank].get(v, median[rank])
                return c + injector.delay(v, c, rank=rank)

            ideal[variant] = simulate(n, b, steps, work)["time"]
            if variant == "b1":
                ideal["sync"] = simulate(n, 0, steps, work)["time"]
            if spec == "none":
                fixed_s[variant] = (measured[variant] - ideal[variant]) / steps
            ideal[f"{variant} with step cost"] = simulate(n, b, steps, work, comm_s=fixed_s[variant])["time"]
            if variant == "b1":
                for rec in r["records"]:
                    arrivals = sorted(a for a in rec.arrival_s if a is not None)
                    if rec.closed_by == "quorum" and len(arrivals) >= n - b:
                        close = arrivals[n - b - 1]
                        latency += [s - close for s in rec.seen_s if s is not None]
        if comm.Get_rank() == 0:
            results[spec] = {
                "steps": steps, "measured_s": measured, "ideal_s": ideal, "step_cost_ms": 1e3 * fixed_s["b1"],
                "backup_over_ideal": measured["b1"] / ideal["b1"],
                "backup_over_ideal_with_step_cost": measured["b1"] / ideal["b1 with step cost"],
                "sync_over_backup": measured["horovod"] / measured["b1"],
                "straggler_learns_close_us": (1e6 * np.percentile(latency, [50, 90])).tolist() if latency else None,
                "overlap": {"step_cost_ms": 1e3 * fixed_s["b1 ov"],
                            "backup_over_ideal": measured["b1 ov"] / ideal["b1 ov"],
                            "backup_over_ideal_with_step_cost": measured["b1 ov"] / ideal["b1 ov with step cost"],
                            "sync_over_backup": measured["horovod"] / measured["b1 ov"]},
            }
    return results


def part_d(hvd, steps: int, reps: int) -> dict:
    """ms per step for b = 1 at ``step()`` and with overlap on the 6M MLP (two buckets: the last two layers, then
    the first); each step each rank pauses 0.2 s with probability 0.25, before the forward pass or between the two
    buckets; interleaved over repetitions, medians."""
    spec, per = "tail:p=0.25,delay=0.2", {}
    for _ in range(reps):
        for where in ("start", "backward"):
            for variant in ("b1", "b1 ov"):
                r = run("b1", "6M", steps, hvd, spec=spec, warmup=2, overlap=variant.endswith("ov"), delay_at=where)
                per.setdefault(where, {}).setdefault(variant, []).append(r["ms_per_step"])
    return {"spec": spec, "steps": steps,
            "ms_per_step": {w: {v: statistics.median(ms) for v, ms in d.items()} for w, d in per.items()},
            "all_ms": per}


def part_c(ops: int = 2000) -> dict:
    """One rank times ``ops`` counter operations on the host's window while the others keep MPI progressing."""
    comm = MPI.COMM_WORLD
    out = {}
    with ArrivalCounter(comm=comm) as counter:
        for name, op in (("peek", counter.peek), ("arrive", counter.arrive)):
            samples = time_one_rank(counter, comm, op, ops)
            out[name] = {"median_us": 1e6 * statistics.median(samples),
                         "p99_us": 1e6 * float(np.percentile(samples, 99))}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--parts", default="abcd")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    hvd = start_horovod_job()
    comm = MPI.COMM_WORLD
    result = {"ranks": comm.Get_size()}
    if "c" in args.parts:
        result["c_counter_latency"] = part_c()
    if "a" in args.parts:
        result["a_no_stragglers"] = part_a(hvd, args.steps, args.reps)
    if "b" in args.parts:
        result["b_injected_delays"] = part_b(hvd, args.steps)
    if "d" in args.parts:
        result["d_pauses_in_backward"] = part_d(hvd, args.steps, args.reps)
    if comm.Get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
