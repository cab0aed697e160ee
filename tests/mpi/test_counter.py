"""The arrival counter on real ranks: distinct orders, atomic close, stop, marks, and slot reuse."""

import pytest

from mpi_tools import ArrivalCounter

from .helpers import need_ranks


@pytest.fixture
def counter(comm):
    c = ArrivalCounter(comm=comm)
    yield c
    c.free()


def test_decode_packs_three_counts():
    value = 3 + 2 * ArrivalCounter.CLOSE + 5 * ArrivalCounter.STOP
    word = ArrivalCounter.decode(value)
    assert (word.arrivals, word.closes, word.stops) == (3, 2, 5)


def test_constructor_rejects_bad_slots(comm):
    with pytest.raises(ValueError, match="slots >= 3"):
        ArrivalCounter(2, comm=comm)


def test_close_is_atomic_with_arrivals(comm, counter):
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    late = size - 1
    if rank != late:
        counter.arrive(0)
    comm.Barrier()
    if rank == 0:
        before = counter.close(0)
        assert ArrivalCounter.decode(before).arrivals == size - 1
    comm.Barrier()
    if rank == late:
        order = counter.arrive(0)
        assert order >= ArrivalCounter.CLOSE  # excluded by any quorum k <= size
    comm.Barrier()
    word = ArrivalCounter.decode(counter.peek(0))
    assert (word.arrivals, word.closes) == (size, 1)


def test_stop_and_marks(comm, counter):
    counter.mark(7)
    counter.stop(0)
    comm.Barrier()
    assert ArrivalCounter.decode(counter.peek(0)).stops == comm.Get_size()
    counter.beat(1234)
    comm.Barrier()
    assert counter.read_marks(timeout=10) == ([7] * comm.Get_size(), [1234] * comm.Get_size())


def test_words_are_reused_for_many_steps_without_cross_counting(comm, counter):
    """Every step's arrivals are exactly a permutation of the ranks, over many reuses of each word, with the
    reset rule the optimizer uses (the host resets word t-1 after step t's collective)."""
    size = comm.Get_size()
    for t in range(3000):
        order = counter.arrive(t)
        orders = comm.allgather(order)  # the step's collective
        assert sorted(orders) == list(range(size)), (t, orders)
        if comm.Get_rank() == counter.root and t > 0:
            counter.reset(t - 1)
