"""The platform the protocol stands on: MPI threads, one-sided MPI beside Horovod, Horovod from a thread."""

import threading
import time

import torch
from mpi4py import MPI

from mpi_tools import ArrivalCounter


def test_mpi_thread_level_is_multiple():
    assert MPI.Query_thread() == MPI.THREAD_MULTIPLE


def test_horovod_init_with_world(hvd, comm):
    assert hvd.is_initialized()
    assert (hvd.rank(), hvd.size()) == (comm.Get_rank(), comm.Get_size())
    assert hvd.mpi_enabled()


def test_fetch_and_op_gives_distinct_arrival_orders_beside_horovod(hvd, comm):
    with ArrivalCounter(comm=comm) as counter:
        order = counter.arrive(0)
        orders = comm.allgather(order)
    assert sorted(orders) == list(range(comm.Get_size())), orders


def test_horovod_allreduce_from_a_thread_completes_while_main_thread_computes(hvd, comm):
    done_at = []

    def communicate():
        handle = hvd.allreduce_async_(torch.ones(1000), name="platform.thread", op=hvd.Sum)
        while not hvd.poll(handle):
            time.sleep(1e-4)
        result = hvd.synchronize(handle)
        assert float(result[0]) == comm.Get_size()
        done_at.append(time.monotonic())

    comm.Barrier()
    a = torch.randn(256, 256)
    thread = threading.Thread(target=communicate)
    start = time.monotonic()
    thread.start()
    while time.monotonic() - start < 3.0 and not done_at:  # busy in torch; stop early once done
        a = torch.tanh(a @ a)
    busy_until = time.monotonic()
    thread.join(30)
    assert done_at, "the allreduce posted from a second thread never completed"
    assert done_at[0] <= busy_until, "the allreduce only completed after the main thread stopped computing"
