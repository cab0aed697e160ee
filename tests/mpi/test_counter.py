"""The arrival counter on real ranks: distinct orders, atomic close, stop, marks, and slot reuse."""

import random
import time

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
    """Every rank arrives while one rank closes, with no barrier between them and random jitter so that the
    close lands anywhere among the arrivals, over many steps (and reuses of each word): whatever the
    interleaving, the close's value counts exactly the arrivals before it, those read the orders 0..m-1, and
    every later arrival reads the close and the orders m..N-1."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    rng = random.Random(rank)
    middle = 0
    for t in range(200):
        closer = t % size
        jitter = [rng.random() * 2e-4 for _ in range(2)]
        time.sleep(jitter[0])
        before = None
        if rank == closer and t % 2:
            before = counter.close(t)
        order = counter.arrive(t)
        if rank == closer and not t % 2:
            time.sleep(jitter[1])
            before = counter.close(t)
        orders, befores = zip(*comm.allgather((order, before)))  # the step's collective
        closed = ArrivalCounter.decode(befores[closer])
        m = closed.arrivals
        assert closed.closes == 0, (t, befores)
        words = [ArrivalCounter.decode(o) for o in orders]
        assert sorted(w.arrivals for w in words if w.closes == 0) == list(range(m)), (t, orders, befores)
        assert sorted(w.arrivals for w in words if w.closes == 1) == list(range(m, size)), (t, orders, befores)
        middle += 0 < m < size
        if rank == counter.root and t > 0:
            counter.reset(t - 1)
    assert middle, "the close never fell between two arrivals"


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
