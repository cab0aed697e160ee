"""``overlap=True``: the gradients leave bucket by bucket during ``backward()``. The same update as the hand-in
at ``step()``; Horovod's rules where they differ (accumulation is declared, ``zero_grad()`` belongs before
``backward()``), each misuse a clear error after which the job goes on; a ``backward()`` never followed by a
``step()`` does not hang ``close()``. (``make test`` also runs this whole suite with ``overlap=True``.)"""

import pytest
import torch
import torch.nn.functional as F

import hvd_backup
from tests.mpi.helpers import batch, make_model

from .idioms import assert_identical, train, wrap


def _wide():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 3))


def test_overlap_applies_the_same_update_as_the_hand_in_at_step(comm, backend):
    """b = 0: 10 steps with 5 buckets equal 10 steps with the whole gradient handed in at step() (up to the
    order in which an allreduce of another size adds the ranks' values)."""
    finals = []
    for overlap in (False, True):
        model = _wide()
        with wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, backend, backup_workers=0,
                  overlap=overlap, bucket_cap_mb=1e-4) as opt:
            if overlap:
                assert len(opt._hvdb_engine.buckets) == 5, opt._hvdb_engine.buckets
            while opt.global_step < 10:
                x, y = batch(opt.global_step, comm.Get_rank())
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                assert opt.last_step.status == "included"
        assert_identical(comm, model, opt, steps=10)
        finals.append([p.detach().clone() for p in model.parameters()])
    for before, after in zip(*finals):
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("misuse, message", [
    ("backward", r"gradient 2 times before step\(\).*backward_passes_per_step=K"),  # accumulation, undeclared
    ("zero_grad", r"zero_grad\(\) after backward\(\) and before step\(\)"),
], ids=["accumulation-undeclared", "zero_grad-after-backward"])
def test_a_misuse_between_backward_and_step_is_a_clear_error(comm, backend, misuse, message):
    """The error names what to do; what left with the first backward() is this step's gradient, and the job
    goes on."""
    model = make_model()
    with wrap(torch.optim.SGD(model.parameters(), lr=0.05), model, backend, overlap=True) as opt:
        x, y = batch(0, comm.Get_rank())
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(RuntimeError, match=message):
            if misuse == "backward":
                F.cross_entropy(model(x), y).backward()
            else:
                opt.zero_grad()
        opt.step()
        statuses = train(comm, model, opt)
    assert_identical(comm, model, opt, statuses=statuses)


def test_backward_without_step_then_close_completes_the_step(comm, backend):
    model = make_model()
    with wrap(torch.optim.SGD(model.parameters(), lr=0.05), model, backend, overlap=True) as opt:
        x, y = batch(0, comm.Get_rank())
        F.cross_entropy(model(x), y).backward()
    assert_identical(comm, model, opt, steps=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"overlap": "yes"}, "overlap='yes' must be True or False"),
    ({"overlap": True, "bucket_cap_mb": 0}, "bucket_cap_mb=0 must be a number of MiB > 0"),
])
def test_bad_overlap_settings_raise_on_every_rank(comm, kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backend="mpi", **kwargs)
