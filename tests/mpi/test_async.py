"""Asynchronous SGD (the paper's baseline) as the trainer's --mode async uses it."""

import torch

from hvd_backup.baselines.async_sgd import AsyncOptimizer

from .helpers import batch, make_model


def test_momentum_is_in_the_checkpoint_and_comes_back(comm):
    model = make_model()
    opt = AsyncOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), comm=comm)
    for _ in range(5):
        x, y = batch(opt.global_step, comm.Get_rank())
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state = opt.state_dict()
    saved = state["hvd_backup"]["momentum"]
    assert torch.equal(saved, opt.momentum) and saved.abs().sum() > 0
    opt.close()
    again = AsyncOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), comm=comm)
    again.load_state_dict(state)
    assert torch.equal(again.momentum, saved) and again.global_step == state["hvd_backup"]["global_step"]
    again.close()


def test_staleness_counts_only_updates_after_the_read(comm):
    model = make_model()
    opt = AsyncOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0), comm=comm)
    comm.Barrier()
    for _ in range(3):
        x, y = batch(opt.global_step, comm.Get_rank())
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    records = opt.pop_records()
    opt.close()
    assert all(0 <= r.staleness <= 3 * comm.Get_size() for r in records)
    if comm.Get_size() == 1:
        assert [r.staleness for r in records] == [0, 0, 0]  # alone: nothing lands between its read and write
