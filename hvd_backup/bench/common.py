"""What the experiments that run on every rank of an MPI job share."""

from __future__ import annotations

import time

import torch
from mpi4py import MPI

__all__ = ["start_horovod_job", "time_one_rank"]


def start_horovod_job():
    """One thread of compute per rank (ranks share this machine's cores) and Horovod on the world; returns
    ``horovod.torch``."""
    torch.set_num_threads(1)
    import horovod.torch as hvd

    hvd.init(comm=MPI.COMM_WORLD)
    return hvd


def time_one_rank(counter, comm, op, count: int) -> list[float]:
    """Seconds of each of ``count`` calls ``op(i)`` made by the last rank alone, while the others keep MPI
    progressing (over TCP the counter's host must enter MPI to serve one-sided operations). Collective; every
    rank gets the samples."""
    last = comm.Get_size() - 1
    comm.Barrier()
    samples = []
    if comm.Get_rank() == last:
        for i in range(count):
            tic = time.perf_counter()
            op(i)
            samples.append(time.perf_counter() - tic)
        comm.Ibarrier().Wait()
    else:
        done = comm.Ibarrier()
        while not done.Test():
            counter.progress()
    return comm.bcast(samples, root=last)
