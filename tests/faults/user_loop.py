"""A user's own training loop on ``hvd_backup.DistributedOptimizer`` (no trainer), in which one rank fails at a
chosen global step. ``tests/faults/test_library_failures.py`` runs it under mpirun:

    python -m mpi_tools.launch -np 4 [--no-shm] -- python tests/faults/user_loop.py --victim 0 --fault freeze

Faults: ``freeze`` (the victim stops itself with SIGSTOP, like a node that stops responding), ``kill``
(SIGKILL), ``raise`` (an exception in the victim's loop, like an out-of-memory error or a bad sample).
Each rank prints ``rank R: at step S`` when the victim's step is reached, so the test knows when the fault came.
"""

import argparse
import os
import signal
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--victim", type=int, required=True)
    parser.add_argument("--fault", choices=("freeze", "kill", "raise"), required=True)
    parser.add_argument("--at", type=int, default=5, help="the global step at which the victim fails")
    parser.add_argument("--backup-workers", type=int, default=1)
    parser.add_argument("--hang-timeout", type=float, default=4.0)
    parser.add_argument("--backend", default="mpi")
    args = parser.parse_args()

    from mpi4py import MPI

    import hvd_backup

    rank = MPI.COMM_WORLD.Get_rank()
    if args.backend == "horovod":
        import horovod.torch as hvd

        hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                          named_parameters=model.named_parameters(), backend=args.backend,
                                          backup_workers=args.backup_workers, hang_timeout=args.hang_timeout)
    gen = torch.Generator().manual_seed(rank)
    while True:  # a run that is still going when the fault comes
        if opt.global_step == args.at:
            print(f"rank {rank}: at step {args.at}", flush=True)
            if rank == args.victim:
                if args.fault == "freeze":
                    os.kill(os.getpid(), signal.SIGSTOP)
                elif args.fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                else:
                    raise RuntimeError(f"rank {rank} failed on purpose at step {args.at}")
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


if __name__ == "__main__":
    sys.exit(main())
