import threading
import time

import pytest

from mpi_tools import Backoff, Deadline


def test_deadline_none_never_expires():
    d = Deadline(None)
    assert not d.expired() and d.remaining() == float("inf")


def test_deadline_expires():
    d = Deadline(0.01)
    time.sleep(0.02)
    assert d.expired() and d.remaining() == 0.0


def test_backoff_doubles_to_cap_and_resets():
    b = Backoff(0.001, 0.004)
    assert [b.interval() for _ in range(4)] == [0.001, 0.002, 0.004, 0.004]
    b.reset()
    assert b.interval() == 0.001


def test_backoff_rejects_bad_bounds():
    with pytest.raises(ValueError, match="0 < first <= cap"):
        Backoff(0.01, 0.001)


def test_poll_returns_when_true_or_at_deadline():
    flag = threading.Event()
    threading.Timer(0.05, flag.set).start()
    assert Backoff(1e-4, 1e-3).poll(flag.is_set, Deadline(5))
    start = time.monotonic()
    assert not Backoff(1e-4, 1e-3).poll(lambda: False, Deadline(0.05))
    assert time.monotonic() - start < 1.0
