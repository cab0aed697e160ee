"""Step time against b under straggler models, side by side in one MPI job (run on every rank under mpirun).

For each straggler model: plain ``hvd.DistributedOptimizer``, this optimizer with b = 0 .. b_max, and
``backup_workers="auto"``; the ideal for every b is the zero-overhead simulation fed with the delays injected
and the compute times measured in the same run (the expected order statistic, catch-ups included). Rank 0
writes the b=1 runs' step records as traces for validating the b-planner.

    mpirun -np 8 python -m hvd_backup.bench.step_time --out step_time.json --traces DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from mpi4py import MPI

from mpi_tools import StragglerInjector

from ..planning.simulate import simulate
from .common import start_horovod_job
from .overhead import run

MODELS = {
    "none": "none",
    "heavy-tailed": "lognormal:median=0.02,sigma=1",
    "one-slow-rank": "fixed:delay=0.15,rank={last}",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-b", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--traces", required=True, help="folder for the b=1 runs' step records")
    args = parser.parse_args(argv)
    hvd = start_horovod_job()
    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    result = {"ranks": n, "steps": args.steps, "models": {}}
    for name, spec in MODELS.items():
        spec = spec.format(last=n - 1)
        row = {"spec": spec, "measured_ms": {}, "ideal_ms": {}, "traces": {}}
        computes = []
        for variant in ["horovod"] + [f"b{b}" for b in range(args.max_b + 1)] + ["auto"]:
            trace = os.path.join(args.traces, f"{name}-{variant}.jsonl") if variant.startswith("b") else None
            r = run(variant, "1M", args.steps, hvd, spec=spec, warmup=2, trace=trace, auto_max=args.max_b)
            row["measured_ms"][variant] = r["ms_per_step"]
            if trace:
                row["traces"][variant] = trace
            if variant == "auto":  # after its first two choices of b
                row["auto_final_b"] = r["final_b"]
                late = [rec.duration_s for rec in r["records"] if rec.step >= 22]
                row["measured_ms"]["auto_steady"] = 1e3 * statistics.fmean(late) if late else float("nan")
            computes.append(comm.gather(r["computes"], root=0))
        if rank == 0:
            pooled = [statistics.median(v for run_c in computes for v in run_c[q].values()) for q in range(n)]
            injector = StragglerInjector(spec, rank=0, size=n, seed=5)

            def work(q, v, pooled=pooled, injector=injector):
                return pooled[q] + injector.delay(v + 2, pooled[q], rank=q)

            for b in range(args.max_b + 1):
                row["ideal_ms"][f"b{b}"] = 1e3 * simulate(n, b, args.steps, work)["time"] / args.steps
            result["models"][name] = row
            print(name, {k: round(v, 1) for k, v in row["measured_ms"].items()}, flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
