"""The README's loop never pops the step records: they must not grow without bound."""

import torch

from .idioms import global_steps, wrap


def test_records_never_popped_stay_bounded(comm):
    steps = 3000
    model = torch.nn.Linear(2, 1)
    x, y = torch.ones(4, 2), torch.zeros(4, 1)
    with wrap(torch.optim.SGD(model.parameters(), lr=0.01), model, "mpi", backup_workers=0) as opt:
        for _ in global_steps(opt, steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        kept = len(opt.pop_records())
    assert kept <= 1024, f"{kept} records kept after {steps} steps"
