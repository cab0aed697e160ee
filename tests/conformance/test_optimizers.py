"""The optimizers users wrap, trained as users train them, with a straggler and b = 1: every rank ends with
bit-identical parameters and optimizer state."""

import pytest
import torch
import torch.nn.functional as F

from tests.mpi.helpers import batch, make_model

from . import idioms
from .idioms import STEPS, assert_identical, global_steps, straggler, wrap

OPTIMIZERS = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "SGD-fused": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, fused=True),
    "SGD-foreach": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
    "Adam-tensor-betas": lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(torch.tensor(0.9), torch.tensor(0.999))),
}


def train(comm, model, opt, *, accumulate: int = 1, set_to_none: bool = True):
    """The README's loop; ``accumulate`` backward passes (micro-batches) per step()."""
    injector, statuses = straggler(comm), []
    for version in global_steps(opt):
        injector.sleep(version)
        opt.zero_grad(set_to_none=set_to_none)
        for micro in range(accumulate):
            x, y = batch(accumulate * version + micro, comm.Get_rank())
            (F.cross_entropy(model(x), y) / accumulate).backward()
        opt.step()
        statuses.append(opt.last_step.status)
    return statuses


@pytest.mark.parametrize("name", [
    "Adam", "AdamW", "SGD-fused", "SGD-foreach",
    "Adam-tensor-betas",
])
def test_optimizer(comm, backend, name):
    model = make_model()
    with wrap(OPTIMIZERS[name](model.parameters()), model, backend) as opt:
        statuses = train(comm, model, opt)
    assert_identical(comm, model, opt, statuses=statuses)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad", "zero_grad-in-place"])
def test_gradient_accumulation(comm, backend, set_to_none):
    """Three backward() per step(): the step averages the accumulated gradients (declared with Horovod's
    keyword where the gradients leave during the backward pass, as Horovod needs it)."""
    model = make_model()
    declared = {"backward_passes_per_step": 3} if idioms.OVERLAP else {}
    with wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, backend, **declared) as opt:
        statuses = train(comm, model, opt, accumulate=3, set_to_none=set_to_none)
    assert_identical(comm, model, opt, statuses=statuses)


def test_bf16_parameters(comm, backend):
    """bf16 parameters and gradients; the count of included ranks must stay exact however it travels."""
    model = make_model().to(torch.bfloat16)
    with wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, backend) as opt:
        injector, statuses = straggler(comm), []
        for version in global_steps(opt):
            injector.sleep(version)
            x, y = batch(version, comm.Get_rank())
            opt.zero_grad()
            F.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
            opt.step()
            statuses.append(opt.last_step.status)
    assert_identical(comm, model, opt, statuses=statuses)


def test_compiled_model(comm):
    """A ``torch.compile``d model: gradients come from a compiled backward graph. The "aot_eager" backend
    traces and differentiates as the default does without generating C++: Inductor's compile of this model
    takes over a minute per rank on 2 cores."""
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager")
    with wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, "mpi") as opt:
        statuses = idioms.train(comm, model, opt, forward=compiled)
    assert_identical(comm, model, opt, statuses=statuses)


def test_two_optimizers(comm, backend):
    """A GAN's discriminator and generator, each with its own wrapped optimizer, stepped alternately."""
    rank = comm.Get_rank()
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    disc = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1))
    injector, statuses = straggler(comm), []
    with wrap(torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999)), disc, backend) as d_opt, \
            wrap(torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999)), gen, backend) as g_opt:
        for _ in range(4 * STEPS):
            if d_opt.global_step >= STEPS and g_opt.global_step >= STEPS:
                break
            step = d_opt.global_step
            injector.sleep(step)
            g = torch.Generator().manual_seed(1000 * step + rank)
            real, noise = torch.randn(16, 8, generator=g) + 1.0, torch.randn(16, 4, generator=g)
            ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
            if d_opt.global_step < STEPS:
                d_opt.zero_grad()
                fake = gen(noise).detach()
                (F.binary_cross_entropy_with_logits(disc(real), ones)
                 + F.binary_cross_entropy_with_logits(disc(fake), zeros)).backward()
                d_opt.step()
                statuses.append(d_opt.last_step.status)
            if g_opt.global_step < STEPS:
                g_opt.zero_grad()
                # With the gradients leaving during backward (Horovod's rule too), the discriminator is frozen
                # here: its hooks would otherwise hand in the generator's loss as its own next gradient.
                disc.requires_grad_(not idioms.OVERLAP)
                F.binary_cross_entropy_with_logits(disc(gen(noise)), ones).backward()
                disc.requires_grad_(True)
                g_opt.step()
                statuses.append(g_opt.last_step.status)
    assert_identical(comm, disc, d_opt, statuses=statuses)
    assert_identical(comm, gen, g_opt)
