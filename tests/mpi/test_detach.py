"""``detach_after``: a rank left out of steps in a row is detached (the others reduce without it), then attached
again at an agreed step by a transfer of the parameters and optimizer state. Checked on real ranks as everywhere:
every rank's parameters and optimizer state bit for bit against the reference's replay of the records, and who
was detached, included and caught up."""

import time

import pytest
import torch

from hvd_backup.protocol import detach

from .helpers import Recorder, assert_matches_reference, assert_same_everywhere, make_model, need_ranks, rank_lr, \
    state_digest, train_until
from .test_optimizer import Delays, initial, make_opt, sgd


@pytest.fixture
def quick_ask(monkeypatch):
    """Ask to be attached again after 0.3 s (doubling), not 5 s."""
    monkeypatch.setattr(detach, "FIRST_ASK", 0.3)


def blame_the_last_rank(monkeypatch, comm, rounds=None):
    """On one host no link is slow: every step counts as slow and each probe round blames the last rank (for the
    first ``rounds`` rounds only, if given), so that what follows the decision runs for real. The decision itself
    is tested in tests/unit/test_detach.py and, on a rate-limited link, in tests/multihost."""
    last, seen = comm.Get_size() - 1, []

    def blame(took):
        seen.append(took)
        return last if last in took and (rounds is None or len(seen) <= rounds) else None

    monkeypatch.setattr(detach.Membership, "_slow", lambda self, step: True)
    monkeypatch.setattr(detach.Membership, "blame", staticmethod(blame))


def adam(params):
    params = list(params)
    return torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "betas": (0.8, 0.99)}],
                            lr=1e-2, weight_decay=1e-4)


@pytest.mark.parametrize("optimizer,overlap", [(sgd, False), (adam, True)], ids=["sgd", "adam-overlap"])
def test_a_rank_blamed_twice_in_a_row_is_detached_then_attached_again(comm, quick_ask, monkeypatch, optimizer,
                                                                       overlap):
    """SGD with momentum at step(); Adam (two moments and a step count per parameter, two groups) with the
    gradients handed in bucket by bucket during backward(): the state that travels is all of it."""
    need_ranks(comm, 2)
    blame_the_last_rank(monkeypatch, comm, rounds=2)
    size, rank = comm.Get_size(), comm.Get_rank()
    slow = size - 1
    model = make_model()
    start_params = initial(model)
    # The last rank takes 0.25 s per gradient for its first 8 steps, then none. Rank 0 (never detached: it hosts
    # the counter) takes 60 ms, so that once the last rank is fast it is the one left out; the others 20 ms.
    delays = Delays(lambda v: (0.25 if v < 8 else 0.0) if rank == slow else 0.06 if rank == 0 else 0.02)
    with make_opt(model, "mpi", optimizer, backup_workers=1, detach_after=2, overlap=overlap,
                  bucket_cap_mb=1e-4) as opt:
        recorder = Recorder(opt, model)
        comm.Barrier()
        mine = train_until(opt, model, 40, delays, recorder=recorder, lr=rank_lr)
        records = opt.pop_records()
        digest = state_digest(model, opt)
        timings = opt.timings()
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert_matches_reference(comm, recorder, records, start_params, optimizer)
    if rank == slow:
        statuses = [rec.status for _, rec in mine]
        assert "caught_up" in statuses and statuses[-1] == "included", statuses
        assert "detached_state" in timings, timings
        return
    assert [r.step for r in records] == list(range(40))
    detached = [r.step for r in records if slow in r.detached]
    assert detached, [(r.step, r.included, r.detached) for r in records]
    assert all(slow not in r.included and r.count <= size - 1 for r in records if slow in r.detached)
    # Attached again once it asked, and included once it is fast.
    assert any(slow in r.included for r in records if r.step > detached[-1]), \
        [(r.step, r.included, r.detached) for r in records]
    assert all(slow not in r.detached for r in records[detached[-1] + 1:])


def test_a_detached_rank_is_attached_when_the_others_leave(comm, monkeypatch):
    """The others reach the end while the slow rank waits, detached, to ask (60 s): when every attached rank has
    left, the counter's host attaches it without being asked, and it ends with the same state."""
    need_ranks(comm, 2)
    monkeypatch.setattr(detach, "FIRST_ASK", 60.0)
    blame_the_last_rank(monkeypatch, comm)
    size, rank = comm.Get_size(), comm.Get_rank()
    slow = size - 1
    model = make_model()
    delays = Delays(lambda v: 0.3 if rank == slow else 0.01)
    tic = time.monotonic()
    with make_opt(model, "mpi", backup_workers=1, detach_after=2) as opt:
        comm.Barrier()
        mine = train_until(opt, model, 15, delays)
        records = opt.pop_records()
        digest = state_digest(model, opt)
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert time.monotonic() - tic < 30, "the slow rank waited for its own ask instead of joining at the end"
    if rank == slow:
        assert mine[-1][1].status == "caught_up", [rec.status for _, rec in mine]
    else:
        assert any(slow in r.detached for r in records), [(r.step, r.included, r.detached) for r in records]
