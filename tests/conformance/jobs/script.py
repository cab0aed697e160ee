"""A user's training script in which one thing goes wrong on the last rank; run by test_jobs.py under mpirun.

    python -m tests.conformance.jobs.script --case raise|freeze|alone [--backup-workers B] [--hang-timeout S]
        [--pairs]

* ``raise``: at global step 10 the last rank raises ``ValueError`` out of the script.
* ``freeze``: at global step 10 the last rank stops itself (SIGSTOP), as a rank stuck in a driver would.
* ``alone``: after the loop the last rank "evaluates" alone for twice ``hang_timeout`` before ``close()``.

With ``--pairs`` the ranks train as independent pairs (``comm=`` a split of ``MPI.COMM_WORLD``): the event
happens on the last rank of the last pair only.

Each event prints ``EVENT <case> <time.time()>`` first, so the test can time what follows; at the end every
rank prints its state digest.
"""

import argparse
import os
import signal
import time

import torch
import torch.nn.functional as F
from mpi4py import MPI

import hvd_backup
from tests.mpi.helpers import batch, make_model, state_digest

STEPS = 40
EVENT_STEP = 10


def event(case: str) -> None:
    print(f"EVENT {case} {time.time():.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["raise", "freeze", "alone"], required=True)
    parser.add_argument("--backup-workers", type=int, default=1)
    parser.add_argument("--hang-timeout", type=float, default=60.0)
    parser.add_argument("--pairs", action="store_true")
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    comm = world.Split(world.Get_rank() // 2) if args.pairs else world
    rank, size = comm.Get_rank(), comm.Get_size()
    victim = size - 1 if world.Get_rank() >= world.Get_size() - size else None
    model = make_model()
    opt = hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                          named_parameters=model.named_parameters(), backend="mpi", comm=comm,
                                          backup_workers=args.backup_workers, hang_timeout=args.hang_timeout)
    while opt.global_step < STEPS:
        version = opt.global_step
        if rank == victim and version >= EVENT_STEP and args.case == "raise":
            event("raise")
            raise ValueError(f"bad sample in batch {version}")
        if rank == victim and version >= EVENT_STEP and args.case == "freeze":
            event("freeze")
            os.kill(os.getpid(), signal.SIGSTOP)
        x, y = batch(version, rank)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    if rank == victim and args.case == "alone":
        event("alone")
        time.sleep(2 * args.hang_timeout)
    opt.close()
    print(f"DIGEST {state_digest(model, opt)}", flush=True)


if __name__ == "__main__":
    main()
