"""The counter host's decisions for ``detach_after`` (hvd_backup.protocol.detach): which steps are slow, and
whose link a probe round blames. What follows a decision runs on real ranks in tests/mpi/test_detach.py, and the
whole on a rate-limited link between emulated hosts in tests/multihost/test_faults.py."""

from hvd_backup.protocol.detach import HISTORY_MIN, LINK_FLOOR, Membership


def _host():
    m = Membership.__new__(Membership)
    m._steps = []
    return m


def test_a_probe_far_slower_than_the_others_is_blamed():
    # 5 Mbit/s against shared memory: 64 KiB in 0.11 s against microseconds.
    assert Membership.blame({1: 2e-5, 2: 3e-5, 3: 0.11}) == 3


def test_probes_that_are_all_slow_blame_no_one():
    # Every link busy (the step's own data on all of them): no rank stands out.
    assert Membership.blame({1: 0.05, 2: 0.08, 3: 0.11}) is None


def test_a_fast_probe_is_never_blamed_however_it_compares():
    # Across hosts against shared memory: 1 ms is over ten times 20 us, but under LINK_FLOOR.
    assert LINK_FLOOR > 1e-3
    assert Membership.blame({1: 2e-5, 2: 2e-5, 3: 1e-3}) is None


def test_a_single_probe_is_judged_against_the_floor_only():
    assert Membership.blame({1: 0.5}) == 1
    assert Membership.blame({1: 1e-3}) is None


def test_a_step_is_slow_only_against_what_is_usual_and_the_floor():
    m = _host()
    assert not any(m._slow(1.0) for _ in range(HISTORY_MIN - 1))  # nothing is usual yet: learning
    m = _host()
    for _ in range(HISTORY_MIN):
        assert not m._slow(0.02)
    assert not m._slow(0.04)  # under SLOW_FLOOR
    assert m._slow(2.0)  # a hundred times the usual
    assert m._steps.count(2.0) == 0  # a slow step does not become usual
    m = _host()
    for _ in range(HISTORY_MIN):
        m._slow(0.3)
    assert not m._slow(1.0) and m._slow(1.3)  # SLOW times the usual 0.3 s

