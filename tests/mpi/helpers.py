"""Helpers for the multi-rank tests: a small model, per-rank data, the global-step loop, digests."""

import hashlib

import pytest
import torch

from mpi_tools import StragglerInjector


def need_ranks(comm, n):
    if comm.Get_size() < n:
        pytest.skip(f"needs at least {n} ranks")


def make_model(seed=0, width=16):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))


def batch(step, rank, n=16):
    """Deterministic data for (step, rank): every rank has its own shard."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_until(opt, model, steps, injector: StragglerInjector | None = None, barrier=None, popped=None):
    """The loop users write: run until the *global* step reaches ``steps``; return this rank's records. With a
    list ``popped``, pop the step records into it after every step, as the trainer does."""
    mine = []
    loss_fn = torch.nn.CrossEntropyLoss()
    while opt.global_step < steps:
        if barrier is not None:
            barrier()
        version = opt.global_step
        if injector is not None:
            injector.sleep(version)
        x, y = batch(version, opt.rank)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        mine.append((version, opt.last_step))
        if popped is not None:
            popped += opt.pop_records()
    return mine


def _bytes(tensor) -> bytes:
    # Through uint8, so that dtypes numpy lacks (bfloat16) hash too.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def state_digest(model, opt) -> str:
    """A hash of every parameter and optimizer-state tensor (bit-exact comparison across ranks)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(_bytes(p))
    for p in model.parameters():
        for key, value in sorted(opt.state.get(p, {}).items()):
            if torch.is_tensor(value):
                h.update(key.encode())
                h.update(_bytes(value))
    return h.hexdigest()


def assert_same_everywhere(comm, value, what):
    everyone = comm.allgather(value)
    assert all(v == everyone[0] for v in everyone), f"{what} differs across ranks: {everyone}"
