"""Learning-rate schedulers stepped once per step(), built before or after wrapping: the global step reaches
its target, and the learning rate is the schedule's at the global step, on every rank, in what is applied
(replayed from the step records) and in what the user reads back."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler

from tests.mpi.helpers import batch, make_model

from .idioms import STEPS, assert_identical, train, wrap

SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=STEPS),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=7),
}


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def replay(name, records):
    """One process: the included ranks' mean gradient at each step, the same optimizer and scheduler. Returns
    the final parameters and the learning rate at each schedule position 0..STEPS."""
    model = make_model()
    opt = sgd(model.parameters())
    sched = SCHEDULERS[name](opt)
    lrs = [opt.param_groups[0]["lr"]]
    for record in records:
        grads = []
        for r in record.included:
            model.zero_grad()
            x, y = batch(record.step, r)
            F.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *gs in zip(model.parameters(), *grads):
            p.grad = torch.stack(gs).sum(0) / len(gs)
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return [p.detach() for p in model.parameters()], lrs




@pytest.mark.parametrize("built", ["before", "after"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler(comm, backend, name, built):
    model = make_model()
    base = sgd(model.parameters())
    sched = SCHEDULERS[name](base) if built == "before" else None
    seen = []
    with wrap(base, model, backend) as opt:
        sched = sched or SCHEDULERS[name](opt)

        def after():
            sched.step()
            seen.append((opt.global_step, opt.param_groups[0]["lr"]))

        statuses = train(comm, model, opt, after=after)  # a None status: step() bypassed the protocol
        records = opt.pop_records()
    params, lrs = replay(name, records)
    lrs += [math.nan] * (STEPS + 1)  # positions past the records: nothing to compare with
    wrong = [(step, lr, lrs[step]) for step, lr in seen if not math.isclose(lr, lrs[step], rel_tol=1e-9)]
    wrong = {rank: w for rank, w in enumerate(comm.allgather(wrong)) if w}  # mostly on the catching-up ranks
    assert_identical(comm, model, opt, statuses=statuses)
    assert [r.step for r in records] == list(range(STEPS))
    assert not wrong, f"rank: [(global step, lr read back, the schedule's lr)]: {wrong}"
    for p, q in zip(model.parameters(), params):  # the update applied at step t used the schedule's lr at t
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-6)
