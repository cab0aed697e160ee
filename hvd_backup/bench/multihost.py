"""Step time of ranks on several hosts, no stragglers, measured side by side in one MPI job (run on every rank
under ``mpirun --host``): hvd_backup with b = 0 and b = 1 on both backends, with the gradient handed in at
``step()`` and during the backward pass (``overlap=True``), against ``hvd.DistributedOptimizer`` and torch's DDP
(gloo), on MLPs of about 1M, 6M and 25M parameters, interleaved over repetitions. What the network between hosts
costs each, so the links are the experiment's (``python -m hvd_backup.bench --only multihost`` runs this on
emulated hosts, with and without a rate limit).

    mpirun --host h1:1,h2:1 python -m hvd_backup.bench.multihost --master-addr ADDRESS_OF_RANK_0 --out m.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch.distributed as dist
from mpi4py import MPI

from .common import start_horovod_job
from .overhead import build, run

# (label, run's variant, our backend, overlap): Horovod's optimizer first, the reference of every ratio.
VARIANTS = [("horovod", "horovod", None, False), ("ddp", "ddp", None, False),
            ("mpi b=0", "b0", "mpi", False), ("mpi b=0 ov", "b0", "mpi", True), ("mpi b=1 ov", "b1", "mpi", True),
            ("horovod b=0", "b0", "horovod", False), ("horovod b=0 ov", "b0", "horovod", True),
            ("horovod b=1 ov", "b1", "horovod", True)]
SIZES = ("1M", "6M", "25M")


def measure(hvd, steps: int, warmup: int, reps: int, sizes=SIZES, labels=None) -> dict:
    """``{size: {"params", "ms_per_step": {label: median}, "all_ms", "over_horovod": {label: ratio}}}``, each
    variant's median of ``reps`` runs of ``steps`` steps after ``warmup`` (``labels``: only those variants,
    Horovod's optimizer always). Collective."""
    variants = [v for v in VARIANTS if labels is None or v[0] in labels or v[0] == "horovod"]
    results = {}
    for size in sizes:
        per = {label: [] for label, *_ in variants}
        for _ in range(reps):
            for label, variant, backend, overlap in variants:
                per[label].append(run(variant, size, steps, hvd, warmup=warmup, backend=backend or "horovod",
                                      overlap=overlap)["ms_per_step"])
        med = {label: statistics.median(ms) for label, ms in per.items()}
        results[size] = {"params": sum(p.numel() for p in build(size)[0].parameters()), "ms_per_step": med,
                         "all_ms": per, "over_horovod": {k: v / med["horovod"] for k, v in med.items()}}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of " + ", ".join(SIZES))
    parser.add_argument("--variants", help="comma-separated labels, of " + ", ".join(v[0] for v in VARIANTS)
                        + " (default: all)")
    parser.add_argument("--master-addr", required=True, help="an address of rank 0's host that every rank reaches")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    hvd = start_horovod_job()
    comm = MPI.COMM_WORLD
    dist.init_process_group("gloo", init_method=f"tcp://{args.master_addr}:{args.master_port}",
                            rank=comm.Get_rank(), world_size=comm.Get_size())
    try:
        result = {"ranks": comm.Get_size(), "hosts": sorted(set(comm.allgather(MPI.Get_processor_name()))),
                  "steps": args.steps, "reps": args.reps,
                  "sizes": measure(hvd, args.steps, args.warmup, args.reps, args.sizes.split(","),
                                   args.variants.split(",") if args.variants else None)}
    finally:
        dist.destroy_process_group()
    if comm.Get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
