"""Uneven inputs, as with PyTorch's ``Join``: ``for x, y in loader:`` with a different number of batches on each
rank, then ``opt.close()``. A rank that has closed contributes nothing from then on; the others go on until
every rank has closed, closing steps with the ranks left; then every rank holds the same parameters and state."""

import pytest
import torch
import torch.nn.functional as F

from tests.mpi.helpers import batch, make_model

from .idioms import assert_identical, straggler, wrap


@pytest.mark.parametrize("b", [1, 0], ids=["b1", "b0"])  # b = 1 first: today it fails in seconds, b = 0 hangs
def test_loaders_of_different_lengths(comm, backend, b):
    rank, size = comm.Get_rank(), comm.Get_size()
    loader = [batch(1000 + i, rank) for i in range(12 + 6 * rank)]  # rank r: 12 + 6r batches
    model = make_model()
    injector, records = straggler(comm), []
    with wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, backend, backup_workers=b) as opt:
        for i, (x, y) in enumerate(loader):
            injector.sleep(i)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            records += opt.pop_records()
        opt.close()  # this rank is done; returns once every rank is
        records += opt.pop_records()
    assert_identical(comm, model, opt, steps=None)
    # Once fewer than N - b ranks are left, steps close with the ranks left, without error (step 0 is the start-up
    # barrier: every rank).
    assert records[0].count == size and all(1 <= r.count <= size - b for r in records[1:]), \
        [r.count for r in records]
    if b == 0:  # every gradient of every rank counted, one step each: as many steps as the longest loader
        assert opt.global_step == 12 + 6 * (size - 1)
