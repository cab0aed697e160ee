"""``torch.amp.GradScaler`` around the wrapped optimizer, fused and not, with and without ``unscale_`` and
clipping: an overflow in any included gradient makes every rank skip that step and back off its scale the
same way; no NaN reaches the parameters; parameters and scale stay identical on every rank."""

import pytest
import torch
import torch.nn.functional as F

from tests.mpi.helpers import batch, make_model

from .idioms import assert_identical, global_steps, straggler, wrap

INIT_SCALE = 2.0 ** 12
# The first gradient a rank computes on the parameters of these global steps overflows (once: should a skipped
# step be taken again, its second try is clean).
EVERY_RANK_OVERFLOWS = {6, 13}  # on every rank: the step is skipped, whoever is in it
RANK_0_OVERFLOWS = {20}  # on rank 0 only: skipped if and only if that gradient is included


@pytest.mark.parametrize("b", [0, 1], ids=["b0", "b1"])
@pytest.mark.parametrize("clip", [False, True], ids=["step", "unscale-clip-step"])
@pytest.mark.parametrize("fused", [
    pytest.param(False),
    pytest.param(True),
], ids=["SGD", "SGD-fused"])
def test_grad_scaler_with_overflows(comm, backend, fused, clip, b):
    rank = comm.Get_rank()
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)  # growth_interval 2000: no growth in this run
    injector, statuses, overflowed, rank_0_in = straggler(comm), [], set(), 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=fused)
    with wrap(optimizer, model, backend, backup_workers=b) as opt:
        for version in global_steps(opt):
            injector.sleep(version)
            x, y = batch(version, rank)
            opt.zero_grad()
            mine = version in EVERY_RANK_OVERFLOWS or (rank == 0 and version in RANK_0_OVERFLOWS)
            inject = mine and version not in overflowed
            # The overflow comes out of backward(), as a real one does (with overlap=True the gradients leave
            # during the backward pass: an edit of .grad after it would not travel).
            loss = F.cross_entropy(model(x), y) * (float("inf") if inject else 1.0)
            scaler.scale(loss).backward()
            if inject:
                overflowed.add(version)
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            statuses.append(opt.last_step.status)
            if inject and version in RANK_0_OVERFLOWS and statuses[-1] == "included":
                rank_0_in += 1
    scales = comm.allgather(scaler.get_scale())
    skipped = len(EVERY_RANK_OVERFLOWS) + comm.bcast(rank_0_in, root=0)
    assert_identical(comm, model, opt, statuses=statuses if b else None)
    assert scales == [INIT_SCALE * 0.5 ** skipped] * len(scales), f"scales {scales}, {skipped} steps overflowed"
