"""What the arrival counter costs as N grows: every rank hammers the host's counter word at once (the worst
case: all ranks arriving together), and one rank alone (latency). Run under mpirun with any N.

    mpirun -np 16 --oversubscribe python -m hvd_backup.bench.counter_cost --out counter.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI

from mpi_tools import ArrivalCounter

from .common import time_one_rank


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    out = {"ranks": n}
    with ArrivalCounter(comm=comm) as counter:
        # Contention: everyone arrives as fast as it can for a while.
        comm.Barrier()
        samples, step, end = [], 0, time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            tic = time.perf_counter()
            counter.arrive(step % 3)
            samples.append(time.perf_counter() - tic)
            counter.progress()  # as the protocol's threads do between operations (the host must serve others)
            step += 1
        ops = comm.allreduce(len(samples))
        medians = comm.gather(statistics.median(samples), root=0)
        # Latency: one rank alone while the others keep MPI progressing (as the protocol's threads do).
        alone = time_one_rank(counter, comm, counter.peek, 500)
        comm.Barrier()
    if rank == 0:
        out.update({"contended_ops_per_s": ops / args.seconds, "contended_median_us": 1e6 * statistics.median(medians),
                    "alone_median_us": 1e6 * statistics.median(alone),
                    "alone_p99_us": 1e6 * float(np.percentile(alone, 99))})
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
