"""What the conformance tests share: the README's loop on the global step, the injected straggler, and the
end-of-run checks (same global step, bit-identical parameters and optimizer state on every rank)."""

import os

import torch
import torch.nn.functional as F

import hvd_backup
from mpi_tools import StragglerInjector
from tests.mpi.helpers import batch, state_digest

STEPS = 30


def straggler(comm, seed: int = 6) -> StragglerInjector:
    """The last rank stalls 80 ms before about a third of its gradients; with seed 6, on 2 or 4 ranks, already
    before its first or second. Longer than a step even on a loaded machine: with b = 1 the others go on, and
    the last rank catches up, so every test runs both the live update and the consensus copy's."""
    size = comm.Get_size()
    return StragglerInjector(f"tail:p=0.3,delay=0.08,rank={size - 1}", rank=comm.Get_rank(), size=size, seed=seed)


# HVD_BACKUP_TEST_OVERLAP=1 runs the whole suite again with the gradients handed in during the backward pass.
OVERLAP = os.environ.get("HVD_BACKUP_TEST_OVERLAP") == "1"


def wrap(optimizer, model, backend, **kw):
    """``hvd_backup.DistributedOptimizer`` as a user switching from Horovod writes it (b = 1 unless given)."""
    kw.setdefault("backup_workers", 1)
    if OVERLAP:
        kw.setdefault("overlap", True)
        kw.setdefault("bucket_cap_mb", 1e-3)  # several buckets even for the small test models
    kw.setdefault("hang_timeout", 60.0)
    return hvd_backup.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), backend=backend,
                                           **kw)


def global_steps(opt, steps: int = STEPS):
    """``while opt.global_step < steps:`` yielding the global step the next gradient is computed on. After
    ``4 * steps`` iterations it fails the test: a ``step()`` that no longer advances the global step (the
    protocol switched off) must not loop forever. Every rank gives up at the same iteration then."""
    for _ in range(4 * steps):
        if opt.global_step >= steps:
            return
        yield opt.global_step
    raise AssertionError(f"global step still {opt.global_step} after {4 * steps} calls of step()")


def train(comm, model, opt, *, forward=None, before=None, after=None) -> list:
    """The README's loop on the global step with the injected straggler: ``before(version)`` ahead of each
    gradient, ``forward`` instead of ``model`` for it, ``after()`` behind each ``step()``. Returns this rank's
    ``opt.last_step.status`` after each step() (``None`` where step() bypassed the protocol)."""
    injector, statuses = straggler(comm), []
    for version in global_steps(opt):
        if before is not None:
            before(version)
        injector.sleep(version)
        x, y = batch(version, comm.Get_rank())
        opt.zero_grad()
        F.cross_entropy((forward or model)(x), y).backward()
        opt.step()
        if after is not None:
            after()
        statuses.append(getattr(opt.last_step, "status", None))
    return statuses


def assert_identical(comm, model, opt, steps: int | None = STEPS, statuses=None):
    """Every rank ends at global step ``steps`` (``None``: any, but the same) with finite, bit-identical
    parameters and optimizer state. With this rank's ``statuses`` (``opt.last_step.status`` after each
    step()), also that some rank caught up: the run used the consensus copy (else it proves little).
    One collective, then the checks, so that a rank that fails does not leave the others waiting."""
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    caught_up = statuses is not None and "caught_up" in statuses
    everyone = comm.allgather((opt.global_step, state_digest(model, opt), finite, caught_up))
    steps_seen = [e[0] for e in everyone]
    assert all(e[2] for e in everyone), f"not finite on ranks {[r for r, e in enumerate(everyone) if not e[2]]}"
    assert len(set(steps_seen)) == 1 and steps in (None, steps_seen[0]), f"global steps {steps_seen}, expected {steps}"
    assert len({e[1] for e in everyone}) == 1, "parameters or optimizer state differ across ranks"
    assert statuses is None or any(e[3] for e in everyone), "no rank ever caught up: the straggler did not straggle"
