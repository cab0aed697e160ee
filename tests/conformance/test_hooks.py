"""Changes to gradients and parameters around the update: step pre/post hooks (clipping of the averaged
gradient, weight clamping, an EMA) run on every update whether it lands on the live parameters or on the
consensus copy; Horovod's synchronize() recipe says what to use instead; ``opt.verify()`` catches edits made
outside those paths."""

import pytest
import torch
import torch.nn.functional as F

import hvd_backup
from tests.mpi.helpers import batch, make_model

from .idioms import assert_identical, train, wrap


def params_of(optimizer):
    # The optimizer the hook receives: the live one, or the consensus copy a catching-up rank updates.
    return [p for group in optimizer.param_groups for p in group["params"]]


def clip_averaged_gradient(optimizer, args, kwargs):
    torch.nn.utils.clip_grad_norm_(params_of(optimizer), 0.05)  # well below this model's gradient norms


def clamp_weights(optimizer, args, kwargs):
    with torch.no_grad():
        for p in params_of(optimizer):
            p.clamp_(-0.2, 0.2)  # the initial weights reach 0.35: the clamp bites from the first step




@pytest.mark.parametrize("kind,hook", [("pre", clip_averaged_gradient), ("post", clamp_weights)],
                         ids=["pre-clip-grad-norm", "post-clamp"])
def test_step_hook(comm, backend, kind, hook):
    model = make_model()
    with wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, backend) as opt:
        register = opt.register_step_pre_hook if kind == "pre" else opt.register_step_post_hook
        register(hook)
        statuses = train(comm, model, opt)
    assert_identical(comm, model, opt, statuses=statuses)


def test_ema_in_a_post_hook(comm, backend):
    """An exponential moving average of the weights, updated after every update: the same on every rank."""
    model = make_model()
    ema = [p.detach().clone() for p in model.parameters()]

    def update_ema(optimizer, args, kwargs):
        with torch.no_grad():
            torch._foreach_lerp_(ema, params_of(optimizer), 0.1)

    with wrap(torch.optim.Adam(model.parameters(), lr=0.01), model, backend) as opt:
        opt.register_step_post_hook(update_ema)
        statuses = train(comm, model, opt)
    assert_identical(comm, model, opt, statuses=statuses)
    everyone = comm.allgather([e.numpy().tobytes() for e in ema])
    assert all(e == everyone[0] for e in everyone), "the EMA differs across ranks"


def test_horovod_synchronize_names_the_supported_way(comm, backend):
    model = make_model()
    with wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, backend) as opt:
        F.cross_entropy(model(batch(0, 0)[0]), batch(0, 0)[1]).backward()
        with pytest.raises(RuntimeError, match="register_step_pre_hook"):
            opt.synchronize()
        with pytest.raises(RuntimeError, match="register_step_pre_hook"):
            with opt.skip_synchronize():
                opt.step()


def test_verify_names_a_parameter_edited_on_one_rank(comm, backend):
    model = make_model()
    with wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, backend) as opt:
        train(comm, model, opt)
        opt.verify()  # all ranks at the same global step with the same parameters: passes
        if comm.Get_rank() == comm.Get_size() - 1:
            with torch.no_grad():
                model[2].bias[1] += 1.0  # outside the optimizer, on one rank
        with pytest.raises(hvd_backup.ProtocolError, match=r"\b2\.bias\b"):
            opt.verify()
