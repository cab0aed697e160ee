"""A Horovod script that changes only the class name keeps working: ``hvd.DistributedOptimizer``'s keywords
are accepted with Horovod's meaning (at b = 0 the result is Horovod's), or refused with a clear error.
Horovod 0.28 has no bf16 compression, so only none and fp16 are tried."""

import pytest
import torch
import torch.nn.functional as F

import hvd_backup
from tests.mpi.helpers import batch

from .idioms import STEPS, assert_identical, global_steps, straggler


KEYWORDS = {  # name: (keywords given hvd, backward passes per step, tolerance against Horovod)
    "compression-none": (lambda hvd: dict(compression=hvd.Compression.none), 1, 1e-6),
    "compression-fp16": (lambda hvd: dict(compression=hvd.Compression.fp16), 1, 1e-3),
    "backward_passes_per_step": (lambda hvd: dict(backward_passes_per_step=2), 2, 1e-6),
    "op-Average": (lambda hvd: dict(op=hvd.Average), 1, 1e-6),
    "op-Sum": (lambda hvd: dict(op=hvd.Sum), 1, 1e-6),
    "gradient_predivide_factor": (lambda hvd: dict(gradient_predivide_factor=2.0), 1, 1e-6),
    "sparse_as_dense": (lambda hvd: dict(sparse_as_dense=True), 1, 1e-6),
    "num_groups": (lambda hvd: dict(num_groups=2), 1, 1e-6),
    "groups": (lambda hvd: dict(groups=2), 1, 1e-6),
    "process_set-global": (lambda hvd: dict(process_set=hvd.global_process_set), 1, 1e-6),
}


def make_model(sparse=False):
    """An embedding and a head; a sparse embedding gives sparse_as_dense something to do."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"emb": torch.nn.EmbeddingBag(10, 8, mode="sum", sparse=sparse),
                                "head": torch.nn.Linear(8, 3)})


def loss_of(model, step, rank, micro=0):
    x, y = batch(2 * step + micro, rank)
    tokens = (x.abs() * 3).long().clamp(max=9)
    return F.cross_entropy(model["head"](model["emb"](tokens)), y)


def train(opt, model, rank, passes, steps):
    """``passes`` backward passes per step(), as Horovod's backward_passes_per_step expects."""
    for version in (global_steps(opt, steps) if hasattr(opt, "global_step") else range(steps)):
        opt.zero_grad()
        for micro in range(passes):
            loss_of(model, version, rank, micro).backward()
        opt.step()


@pytest.mark.parametrize("name", list(KEYWORDS))
def test_horovod_keyword(comm, hvd, name):
    given, passes, tol = KEYWORDS[name]
    rank = comm.Get_rank()
    sparse = name == "sparse_as_dense"
    results = []
    for wrap in (hvd.DistributedOptimizer, lambda o, **kw: hvd_backup.DistributedOptimizer(o, backup_workers=0, **kw)):
        model = make_model(sparse)
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
                   **given(hvd))
        train(opt, model, rank, passes, 10)
        if hasattr(opt, "close"):
            opt.close()
        results.append([p.detach().clone() for p in model.parameters()])
    as_horovod = comm.allgather(all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(*results)))
    # And with a straggler and b = 1: identical on every rank.
    model = make_model(sparse)
    with hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         named_parameters=model.named_parameters(), backup_workers=1,
                                         hang_timeout=60.0, **given(hvd)) as opt:
        injector, statuses = straggler(comm), []
        for version in global_steps(opt):
            injector.sleep(version)
            opt.zero_grad()
            for micro in range(passes):
                loss_of(model, version, rank, micro).backward()
            opt.step()
            statuses.append(opt.last_step.status)
    assert_identical(comm, model, opt, STEPS, statuses=statuses)
    assert all(as_horovod), f"b = 0 differs from Horovod on ranks {[r for r, ok in enumerate(as_horovod) if not ok]}"


@pytest.mark.parametrize("name,message", [("Adasum", "Adasum"), ("process_set", "process_set")])
def test_horovod_keyword_refused_clearly(comm, hvd, name, message):
    model = make_model()
    given = dict(op=hvd.Adasum) if name == "Adasum" else dict(process_set=hvd.ProcessSet([0]))
    with pytest.raises(ValueError, match=message):
        hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backup_workers=0,
                                        named_parameters=model.named_parameters(), **given)
