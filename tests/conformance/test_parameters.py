"""What users change on an optimizer after wrapping it: which parameters train (``requires_grad``), its
groups (``add_param_group``), its hyper-parameters (by hand, with their own types); and the README's order,
broadcasting the initial weights after wrapping."""

import time

import pytest
import torch
import torch.nn.functional as F

import hvd_backup
from tests.mpi.helpers import batch, make_model

from . import idioms
from .idioms import assert_identical, wrap

SWITCH = 10  # the global step from which the change holds


def train(comm, model, opt, at_switch=None, every_step=None):
    """The README's loop; ``at_switch()`` once, before the first gradient on global step >= SWITCH;
    ``every_step(version)`` before each gradient."""
    switched = []

    def before(version):
        if at_switch is not None and version >= SWITCH and not switched:
            at_switch()
            switched.append(version)
        if every_step is not None:
            every_step(version)

    return idioms.train(comm, model, opt, before=before)


def test_freezing_a_layer_after_wrapping(comm, backend):
    """A frozen layer stops moving, as in plain torch: no momentum, no weight decay, on every rank."""
    model = make_model()
    at_freeze = []

    def freeze():
        model[0].requires_grad_(False)
        at_freeze.extend(p.detach().clone() for p in model[0].parameters())

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    with wrap(optimizer, model, backend) as opt:
        statuses = train(comm, model, opt, at_switch=freeze)
    still = all(torch.equal(a, p) for a, p in zip(at_freeze, model[0].parameters()))
    assert_identical(comm, model, opt, statuses=statuses)
    assert all(comm.allgather(still)), "the frozen layer moved after it was frozen"


def test_unfreezing_a_layer_after_wrapping(comm, backend):
    """Fine-tuning: the first layer is frozen when the optimizer is wrapped and unfrozen later; from then on it
    trains on the averaged gradient like the rest."""
    model = make_model()
    model[0].requires_grad_(False)
    initial = [p.detach().clone() for p in model[0].parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with wrap(optimizer, model, backend) as opt:
        statuses = train(comm, model, opt, at_switch=lambda: model[0].requires_grad_(True))
    assert_identical(comm, model, opt, statuses=statuses)
    assert not torch.equal(initial[0], model[0].weight), "the unfrozen layer did not train"


def test_add_param_group_after_wrapping_is_a_clear_error(comm, backend):
    model = make_model()
    head = torch.nn.Linear(3, 3)
    with wrap(torch.optim.SGD(model.parameters(), lr=0.05), model, backend) as opt:
        opt.add_param_group({"params": list(head.parameters()), "lr": 0.01})
        x, y = batch(0, comm.Get_rank())
        opt.zero_grad()
        F.cross_entropy(head(model(x)), y).backward()
        with pytest.raises(ValueError, match="add_param_group"):
            opt.step()


def test_an_int_learning_rate_changed_by_hand(comm, backend):
    """``lr=1`` (an int), set to 0.5 by hand from step SWITCH on: every step from SWITCH applies 0.5 on every
    rank (the consensus copy too, whose own lr is still the int 1), and a rank reads back what its own loop set.
    A rank that catches up past the last step never runs its loop at SWITCH or later: its groups keep its own
    lr (the documented rule: a catch-up restores parameters and state, not the groups' settings)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    model = make_model()
    lagged, halved = [], []

    def halve():
        halved.append(True)
        for group in opt.param_groups:
            group["lr"] = 0.5

    def lag_across_the_switch(version):
        # The last rank falls 0.3 s behind just before the switch: the others take the steps across it
        # without this rank, whose consensus copy (made while its lr was still the int 1) applies them.
        if rank == size - 1 and SWITCH - 2 <= version < SWITCH and not lagged:
            lagged.append(version)
            time.sleep(0.3)

    with wrap(torch.optim.SGD(model.parameters(), lr=1), model, backend) as opt:
        statuses = train(comm, model, opt, at_switch=halve, every_step=lag_across_the_switch)
        lrs = comm.allgather((opt.param_groups[0]["lr"], bool(halved)))
    assert_identical(comm, model, opt, statuses=statuses)
    assert lrs == [(0.5, True) if h else (1, False) for _, h in lrs], lrs
    assert all(type(lr) is int for lr, h in lrs if not h), lrs


def test_broadcast_after_wrapping(comm, backend):
    """The README's order with different initial weights on each rank: wrap, then broadcast rank 0's."""
    model = make_model(seed=comm.Get_rank())
    with wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, backend) as opt:
        if backend == "horovod":
            import horovod.torch as hvd

            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        else:
            hvd_backup.broadcast_parameters(model.state_dict(), root_rank=0)
        statuses = train(comm, model, opt)
    assert_identical(comm, model, opt, statuses=statuses)
