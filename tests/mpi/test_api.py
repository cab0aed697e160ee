"""The public API as user scripts drive it, on real ranks: broadcast_parameters from really different weights,
request_stop from a signal handler, opt.timings(), and step(closure)."""

import os
import signal
import time

import pytest
import torch

import hvd_backup

from .helpers import (Recorder, assert_matches_reference, assert_same_everywhere, batch, make_model, need_ranks,
                      state_digest, train_until)
from .test_optimizer import Delays, initial, make_opt, sgd


def model_with_buffers(seed):
    """Parameters and buffers (BatchNorm's running statistics, one of them an integer)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
    model.train()
    model(torch.randn(32, 8))  # running statistics that differ between seeds
    return model


@pytest.mark.parametrize("form", ["state_dict", "named_parameters"])
def test_broadcast_parameters_gives_every_rank_the_roots_weights(comm, form):
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    root = size - 1
    model = model_with_buffers(seed=rank)  # every rank really starts from its own weights
    different = len(set(comm.allgather(state_digest(model, torch.optim.SGD(model.parameters(), lr=0.1))))) == size
    theirs = comm.bcast({k: v.clone() for k, v in model.state_dict().items()}, root=root)
    params = model.state_dict() if form == "state_dict" else model.named_parameters()
    hvd_backup.broadcast_parameters(params, root_rank=root)
    assert different
    names = dict(model.named_parameters()) if form == "named_parameters" else model.state_dict()
    for name in names:  # named_parameters() holds no buffers
        assert torch.equal(model.state_dict()[name], theirs[name]), name


def test_broadcast_after_wrapping_from_different_weights_with_a_slow_start(comm, backend):
    """The README's order: wrap the optimizer, then broadcast. Ranks start from different weights and the last
    rank reaches its broadcast late (it builds its data loader, say): every rank must still train from the
    root's weights, bit for bit."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    model = make_model(seed=rank)
    start_params = comm.bcast(initial(model), root=0)
    with make_opt(model, backend, backup_workers=1) as opt:
        recorder = Recorder(opt, model)
        if rank == size - 1:
            time.sleep(0.5)
        hvd_backup.broadcast_parameters(model.state_dict(), root_rank=0)
        train_until(opt, model, 10, recorder=recorder)
        records = opt.pop_records()
    assert_matches_reference(comm, recorder, records, start_params, sgd)


def test_request_stop_from_a_signal_handler_ends_every_rank_after_the_same_step(comm, backend):
    """Outside Slurm: one rank (not rank 0) gets SIGUSR1, whose handler asks to stop; with a slow rank that
    catches up and b = 1, every rank's loop ends at the same global step."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    asker, slow = 1, size - 1  # on two ranks, the slow rank asks
    model = make_model()
    loss_fn = torch.nn.CrossEntropyLoss()
    asked = False
    with make_opt(model, backend, backup_workers=1) as opt:
        previous = signal.signal(signal.SIGUSR1, lambda *_: opt.request_stop())
        try:
            while not opt.stop_requested and opt.global_step < 200:
                if rank == asker and opt.global_step >= 10 and not asked:
                    os.kill(os.getpid(), signal.SIGUSR1)
                    asked = True
                if rank == slow:
                    time.sleep(0.02)
                x, y = batch(opt.global_step, rank)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        finally:
            signal.signal(signal.SIGUSR1, previous)
        stopped_at = opt.global_step
        digest = state_digest(model, opt)
    assert_same_everywhere(comm, stopped_at, "the global step at which the loop ended")
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert 10 < stopped_at < 100, stopped_at  # without the request the loops would run to 200


def test_timings_count_every_phase_and_reset(comm, backend):
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    model = make_model()
    slow = Delays(lambda v: 0.5 if rank == size - 1 and v in (3, 7) else 0.0)  # the others go on meanwhile
    with make_opt(model, backend, backup_workers=1) as opt:
        recorder = Recorder(opt, model)
        start = time.monotonic()
        mine = train_until(opt, model, 12, slow, recorder=recorder)
        elapsed = time.monotonic() - start
        records = opt.pop_records()
        timings = opt.timings(reset=True)
        after_reset = opt.timings()
    calls = len(mine)
    caught_up = sum(rec.status == "caught_up" for _, rec in mine)
    counts = {phase: count for phase, (_, count) in timings.items()}
    # Steps whose close this rank learnt from a notice: at most those it did not arrive at.
    assert counts.pop("close_notice", 0) <= len(records) - len(recorder.arrivals), counts
    expected = {"flatten": calls, "blocked_in_step": calls, "arrive": len(recorder.arrivals),
                "posted": len(records), "allreduce": len(records), "reduce": len(records), "apply": len(records), "catch_up": caught_up}
    assert counts == {phase: n for phase, n in expected.items() if n}, (counts, expected)
    assert all(seconds >= 0 for seconds, _ in timings.values())
    assert timings["blocked_in_step"][0] <= elapsed
    assert after_reset == {}
    if rank == size - 1:
        assert caught_up, [rec.status for _, rec in mine]


def test_step_with_a_closure_under_no_grad(comm, backend):
    """``opt.step(closure)``: the closure runs with gradients enabled even where step() is called without
    them (as torch's optimizers do), step() returns its loss, and the loss travels in the step's record."""
    rank = comm.Get_rank()
    model = make_model()
    start_params = initial(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    returned, reported = [], []
    with make_opt(model, backend, backup_workers=0) as opt:
        recorder = Recorder(opt, model)
        for step in range(4):
            x, y = batch(step, rank)

            def closure():
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                recorder.hand_in(model)
                return loss

            with torch.no_grad():
                loss = opt.step(closure)
            returned.append(loss.item())
            reported.append(opt.last_step.loss[rank])
        records = opt.pop_records()
    assert_matches_reference(comm, recorder, records, start_params, sgd)
    assert returned == reported
