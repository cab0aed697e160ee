"""hvd_backup.DistributedOptimizer on real ranks, with both backends."""

import time

import pytest
import torch

import hvd_backup
from mpi_tools import StragglerInjector

from .helpers import assert_same_everywhere, batch, make_model, need_ranks, state_digest, train_until


def make_opt(model, backend, **kw):
    kw.setdefault("hang_timeout", 60.0)
    return hvd_backup.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), named_parameters=model.named_parameters(),
        backend=backend, **kw)


def test_a_rank_sleeping_2s_per_step_is_not_waited_for(comm, backend):
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    slow = size - 1
    model = make_model()
    injector = StragglerInjector(f"fixed:delay=2,rank={slow}", rank=rank, size=size)
    with make_opt(model, backend, backup_workers=1) as opt:
        comm.Barrier()
        start = time.monotonic()
        mine = train_until(opt, model, 10, injector)
        elapsed = time.monotonic() - start
        records = opt.pop_records()
        digest = state_digest(model, opt)
    # Collective first: a rank that fails an assertion below must not leave the others waiting in it.
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert [r.step for r in records] == list(range(10))
    # Step 0 waits for every rank (the start-up barrier); from then on the sleeping rank is never waited for.
    assert records[0].count == size and all(r.count == size - 1 and slow not in r.included for r in records[1:])
    if rank == slow:
        assert mine and all(rec.status in ("dropped", "caught_up") for _, rec in mine[1:])
    else:
        # Waiting for the slow rank once more would take 2 s; nine steps of this model take milliseconds.
        assert elapsed < 2 + 1.9, f"10 steps took {elapsed:.2f}s: the group waited for the sleeping rank"
        assert all(rec.status == "included" for _, rec in mine)


def test_popping_records_before_a_catch_up_is_safe(comm, backend):
    """The trainer's loop: step(), then pop_records(), then the next gradient. A rank that is slow between
    step() and pop_records() pops the records of steps it missed, then hands in a gradient that is already
    stale: it still catches up (the catch-up must not depend on records the user has taken)."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    slow = size - 1
    model = make_model()
    loss_fn = torch.nn.CrossEntropyLoss()
    popped, statuses = [], []
    with make_opt(model, backend, backup_workers=1) as opt:
        while opt.global_step < 40:
            version = opt.global_step
            x, y = batch(version, rank)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            statuses.append(opt.last_step.status)
            if rank == slow and version % 2:
                time.sleep(0.1)  # the others take steps without this rank, then it pops their records
            popped += opt.pop_records()
        popped += opt.pop_records()
        digest = state_digest(model, opt)
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert [r.step for r in popped] == list(range(len(popped))) and len(popped) >= 40
    if rank == slow:
        assert "caught_up" in statuses, statuses


def test_1000_steps_of_random_delays_include_exactly_the_quorum(comm, backend):
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    b = 1
    model = make_model(width=8)
    injector = StragglerInjector("exp:mean=0.001", rank=rank, size=size, seed=11)
    with make_opt(model, backend, backup_workers=b) as opt:
        mine = train_until(opt, model, 1000, injector)
        records = opt.pop_records()
        digest = state_digest(model, opt)
    assert_same_everywhere(comm, [r.included for r in records], "included sets")
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert [r.step for r in records] == list(range(1000))
    assert records[0].closed_by == "all"  # the start-up barrier
    assert all(r.count == size - b and len(r.included) == size - b for r in records[1:])
    assert all(r.closed_by == "quorum" for r in records[1:])
    # A gradient only ever counts for the step whose parameters it was computed on.
    for version, rec in mine:
        if rec.status == "included":
            assert rec.step == version and rank in rec.included
        if rec.status == "caught_up":
            assert rec.step >= version


@pytest.mark.parametrize("seed", [1, 2])
def test_included_ranks_follow_the_injected_order(comm, backend, seed):
    """Delays 150 ms apart (a loaded 2-core machine deschedules a rank for tens of ms), all ranks starting each
    step together: the k fastest are exactly the included."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    b = 1
    steps = 6
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(size, generator=gen).tolist() for _ in range(steps)]
    delay = {s: 0.15 * perms[s][rank] for s in range(steps)}
    model = make_model()
    with make_opt(model, backend, backup_workers=b) as opt:
        mine = []
        while opt.global_step < steps:
            comm.Barrier()
            v = opt.global_step
            x, y = batch(v, rank)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            time.sleep(delay[v])
            opt.step()
            mine.append(opt.last_step)
        records = opt.pop_records()
    for r in records[1:]:  # step 0 waits for every rank
        expected = tuple(sorted(sorted(range(size), key=lambda q: perms[r.step][q])[: size - b]))
        assert r.included == expected, (r.step, r.included, expected)
    for rec in mine:
        # Not included: its gradient either missed the step it was computed for, or arrived after that step
        # was applied, so the parameters caught up.
        assert rec.status == "included" if rank in rec.included else rec.status in ("dropped", "caught_up")


def test_straggler_timeout_closes_with_fewer_than_quorum(comm, backend):
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    b = 1 if size > 2 else 0
    slow = list(range(size - b - 1, size))  # b + 1 slow ranks: the quorum can never be met in time
    min_workers = size - b - 1
    injector = StragglerInjector(f"fixed:delay=1.5,rank={'/'.join(map(str, slow))}", rank=rank, size=size)
    model = make_model()
    with make_opt(model, backend, backup_workers=b, straggler_timeout=0.2, min_workers=min_workers) as opt:
        comm.Barrier()
        start = time.monotonic()
        train_until(opt, model, 5, injector)
        elapsed = time.monotonic() - start
        records = opt.pop_records()
        digest = state_digest(model, opt)
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert all(r.closed_by == "timeout" and min_workers <= r.count < size - b for r in records[1:]), records
    if rank not in slow:
        # After step 0 (which waits for every rank), each step closes about 0.2 s after the first arrival
        # instead of waiting 1.5 s for the slow ranks.
        assert elapsed < 1.5 + 4 * 1.0, f"5 steps took {elapsed:.2f}s"


def test_auto_b_learns_to_drop_a_slow_rank_and_all_ranks_agree(comm, backend):
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    injector = StragglerInjector(f"fixed:delay=0.15,rank={size - 1}", rank=rank, size=size)
    model = make_model()
    with make_opt(model, backend, backup_workers="auto", auto_every=8, max_backup_workers=1) as opt:
        records = []  # popped after every step, as the trainer does: the choice must not depend on it
        train_until(opt, model, 24, injector, popped=records)
        records += opt.pop_records()
        b_now = opt.backup_workers
    assert [r.quorum for r in records[:8]] == [size] * 8  # starts synchronous
    assert all(r.quorum == size - 1 for r in records[8:]), [r.quorum for r in records]
    assert b_now == 1
    assert_same_everywhere(comm, [r.quorum for r in records], "the quorum of each step")


def test_auto_b_decides_the_same_whoever_pops_the_records(comm, backend):
    """Rank 0 pops the step records after every step, the others never do: the choice of b still rests on
    the same window of steps everywhere. The last rank is slow in 6 of every 8 steps, so the window says b=1
    while the latest step alone would say b=0."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()

    class SlowMostly:
        def sleep(self, version):
            if rank == size - 1 and version % 8 < 6:
                time.sleep(0.1)

    model = make_model()
    popped = []
    with make_opt(model, backend, backup_workers="auto", auto_every=8, max_backup_workers=1) as opt:
        train_until(opt, model, 8, SlowMostly(), popped=popped if rank == 0 else None)
        b_now = opt.backup_workers
        popped += opt.pop_records()
    assert [r.step for r in popped] == list(range(len(popped)))
    assert_same_everywhere(comm, b_now, "the chosen b")
    assert b_now == 1


def test_b0_is_plain_synchronous_sgd(comm, backend):
    """With b = 0 every rank is in every step and the update is the mean over all ranks."""
    size = comm.Get_size()
    model = make_model()
    with make_opt(model, backend, backup_workers=0) as opt:
        mine = train_until(opt, model, 5)
        records = opt.pop_records()
    assert all(r.count == size and r.closed_by == "all" for r in records)
    assert all(rec.status == "included" for _, rec in mine)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_b0_equals_horovod_distributed_optimizer(comm, hvd, momentum):
    steps = 50

    def run(wrap):
        model = make_model(seed=3)
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum), model)
        for step in range(steps):
            x, y = batch(step, comm.Get_rank())
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if hasattr(opt, "close"):
            opt.close()
        return [p.detach().clone() for p in model.parameters()]

    ours = run(lambda o, m: hvd_backup.DistributedOptimizer(o, m.named_parameters(), backup_workers=0))
    theirs = run(lambda o, m: hvd.DistributedOptimizer(o, named_parameters=m.named_parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_step_after_close_is_an_error(comm, backend):
    model = make_model()
    opt = make_opt(model, backend, backup_workers=0)
    opt.close()
    with pytest.raises(RuntimeError, match="after close"):
        opt.step()


def test_resume_restores_the_global_step(comm, backend):
    """A state_dict carries the global step; loading it on every rank continues from there."""
    model = make_model()
    with make_opt(model, backend, backup_workers=0) as opt:
        train_until(opt, model, 3)
        saved_model, saved_opt = model.state_dict(), opt.state_dict()
    assert saved_opt["hvd_backup"] == {"global_step": 3}
    resumed = make_model(seed=9)
    resumed.load_state_dict(saved_model)
    with make_opt(resumed, backend, backup_workers=0) as opt:
        opt.load_state_dict(saved_opt)
        assert opt.global_step == 3
        train_until(opt, resumed, 6)
        records = opt.pop_records()
        digest = state_digest(resumed, opt)
    assert [r.step for r in records] == [3, 4, 5]
    assert_same_everywhere(comm, digest, "parameters and momentum")


BAD = [
    (dict(backup_workers=-1), "backup_workers=-1 must be an integer with 0 <= b < N"),
    (dict(backup_workers="N"), "backup_workers='N' must be an integer with 0 <= b < N=.*, or 'auto'"),
    (dict(backup_workers="auto", max_backup_workers=-1), "max_backup_workers=-1 must be None or an integer"),
    (dict(backup_workers="auto", auto_every=0), "auto_every=0 must be an integer >= 1"),
    (dict(backup_workers=1.5), "backup_workers=1.5 must be an integer"),
    (dict(backup_workers="size"), "must be an integer with 0 <= b < N"),
    (dict(straggler_timeout=0), "straggler_timeout=0 must be None or seconds > 0"),
    (dict(straggler_timeout=-2.0), "straggler_timeout=-2.0 must be None or seconds > 0"),
    (dict(straggler_timeout="soon"), "straggler_timeout='soon' must be None or seconds > 0"),
    (dict(hang_timeout=0), "hang_timeout=0 must be seconds > 0"),
    (dict(hang_timeout=float("inf")), "hang_timeout=inf must be seconds > 0"),
    (dict(min_workers=0), "min_workers=0 must be an integer with 1 <= min_workers <= N-b"),
    (dict(min_workers="quorum+1"), "must be an integer with 1 <= min_workers <= N-b"),
    (dict(backend="nccl"), "backend='nccl' is not one of 'horovod', 'mpi'"),
    (dict(max_lag=0), "max_lag=0 must be None or an integer >= 1"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[next(iter(k)) + "=" + repr(next(iter(k.values()))) for k, _ in BAD])
def test_bad_settings_raise_on_every_rank(comm, kwargs, message):
    size = comm.Get_size()
    kwargs = dict(kwargs)
    if kwargs.get("backup_workers") == "size":
        kwargs["backup_workers"] = size
    if kwargs.get("min_workers") == "quorum+1":
        kwargs["backup_workers"] = 1 if size > 1 else 0
        kwargs["min_workers"] = size - kwargs["backup_workers"] + 1
    kwargs.setdefault("backup_workers", 0)
    kwargs.setdefault("backend", "mpi")
    model = make_model()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_settings_that_differ_across_ranks_name_the_rank(comm):
    need_ranks(comm, 2)
    rank = comm.Get_rank()
    model = make_model()
    with pytest.raises(ValueError, match=r"hang_timeout differs across ranks: rank 0 has 60.0, rank 1 has 61.0"):
        hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backup_workers=0,
                                        backend="mpi", hang_timeout=60.0 + min(rank, 1))
