"""hvd_backup.DistributedOptimizer on real ranks, with both backends.

Every test with backup workers, a straggler timeout or catch-ups records what each rank handed in and checks
every rank's parameters and optimizer state, bit for bit, against the reference (``tests/mpi/reference.py``),
which replays the protocol's math in one process with a plain torch optimizer."""

import time

import pytest
import torch

import hvd_backup
from mpi_tools import StragglerInjector

from .helpers import (Recorder, assert_matches_reference, assert_same_everywhere, batch, make_model, need_ranks,
                      rank_lr, state_digest, train_until)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def make_opt(model, backend, optimizer=sgd, **kw):
    kw.setdefault("hang_timeout", 60.0)
    return hvd_backup.DistributedOptimizer(optimizer(model.parameters()), named_parameters=model.named_parameters(),
                                           backend=backend, **kw)


def initial(model):
    return [p.detach().clone() for p in model.parameters()]


class Delays:
    """Per step, how long this rank takes before it hands in (``train_until``'s injector)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def sleep(self, version):
        time.sleep(self.seconds(version))


def test_a_rank_sleeping_3s_per_step_is_not_waited_for(comm, backend):
    """With the mpi backend rank 0 is the slow rank: it hosts the arrival counter, and while its training thread
    sleeps its communication thread must still serve the others' arrivals (without shared memory too,
    np4-noshm). With Horovod's, the last rank (the backends differ only in the allreduce)."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    slow = 0 if backend == "mpi" else size - 1
    model = make_model()
    start_params = initial(model)
    injector = StragglerInjector(f"fixed:delay=3,rank={slow}", rank=rank, size=size)
    with make_opt(model, backend, backup_workers=1) as opt:
        recorder = Recorder(opt, model)
        comm.Barrier()
        start = time.monotonic()
        mine = train_until(opt, model, 10, injector, recorder=recorder, lr=rank_lr)
        elapsed = time.monotonic() - start
        records = opt.pop_records()
        digest = state_digest(model, opt)
    # The checks that every rank takes part in come first: a rank that failed a check of its own before them
    # would leave the others waiting in them.
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert_matches_reference(comm, recorder, records, start_params, sgd)
    assert [r.step for r in records] == list(range(10))
    # Step 0 waits for every rank (the start-up barrier); from then on the sleeping rank is never waited for.
    assert records[0].count == size and all(r.count == size - 1 and slow not in r.included for r in records[1:])
    if rank == slow:
        assert mine and all(rec.status in ("dropped", "caught_up") for _, rec in mine[1:])
    else:
        # Waiting for the slow rank once more would take 3 s; nine steps of this model take milliseconds (up
        # to 2.3 s on two loaded cores when rank 0 sleeps without shared memory: each step then waits for its
        # communication thread's polls).
        assert elapsed < 3 + 2.8, f"10 steps took {elapsed:.2f}s: the group waited for the sleeping rank"
        assert all(rec.status == "included" for _, rec in mine)


def test_popping_records_before_a_catch_up_is_safe(comm, backend):
    """The trainer's loop: step(), then pop_records(), then the next gradient. A rank that is slow between
    step() and pop_records() pops the records of steps it missed, then hands in a gradient that is already
    stale: it still catches up (the catch-up must not depend on records the user has taken)."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    slow = size - 1
    model = make_model()
    start_params = initial(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    popped, statuses = [], []
    with make_opt(model, backend, backup_workers=1) as opt:
        recorder = Recorder(opt, model)
        while opt.global_step < 40:
            version = opt.global_step
            x, y = batch(version, rank)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            recorder.hand_in(model)
            opt.step()
            statuses.append(opt.last_step.status)
            if rank == slow and version % 2:
                time.sleep(0.1)  # the others take steps without this rank, then it pops their records
            popped += opt.pop_records()
        popped += opt.pop_records()
        digest = state_digest(model, opt)
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert_matches_reference(comm, recorder, popped, start_params, sgd)
    assert [r.step for r in popped] == list(range(len(popped))) and len(popped) >= 40
    if rank == slow:
        assert "caught_up" in statuses, statuses


@pytest.mark.parametrize("overlap", [False, True], ids=["", "overlap"])
def test_1000_steps_of_random_delays_include_exactly_the_quorum(comm, backend, overlap):
    """Every rank is now and then the late one (its gradient arrives after the quorum: dropped) and now and
    then the first; each rank's learning rate is its own, so only the first arriver's may be applied. With
    ``overlap``, a rank arrives with its first bucket, and a late one is caught up after its step()."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    b, steps = 1, 300 if overlap else 1000
    model = make_model(width=8)
    start_params = initial(model)
    injector = StragglerInjector("exp:mean=0.001", rank=rank, size=size, seed=11)
    # The reference with one backend only (they differ only in the allreduce, which the other tests check
    # against it with both): replaying 1,000 steps takes seconds.
    with make_opt(model, backend, backup_workers=b, overlap=overlap, bucket_cap_mb=1e-4) as opt:
        recorder = Recorder(opt, model) if backend == "mpi" else None
        mine = train_until(opt, model, steps, injector, recorder=recorder, lr=rank_lr)
        records = opt.pop_records()
        digest = state_digest(model, opt)
    assert_same_everywhere(comm, [r.included for r in records], "included sets")
    assert_same_everywhere(comm, digest, "parameters and momentum")
    if recorder is not None:
        assert_matches_reference(comm, recorder, records, start_params, sgd)
    # What makes this run a test of the reweighting and of the first arriver's hyper-parameters:
    firsts = {r.included[min(range(r.count), key=lambda i: r.arrival_s[r.included[i]])] for r in records}
    dropped = comm.allreduce(sum(rec.status in ("dropped", "caught_up") for _, rec in mine))
    assert len(firsts) >= 2 and dropped >= 10, (firsts, dropped)
    assert [r.step for r in records] == list(range(steps))
    assert records[0].closed_by == "all"  # the start-up barrier
    assert all(r.count == size - b and len(r.included) == size - b for r in records[1:])
    assert all(r.closed_by == "quorum" for r in records[1:])
    # A gradient only ever counts for the step whose parameters it was computed on.
    for version, rec in mine:
        if rec.status == "included":
            assert rec.step == version and rank in rec.included
        if rec.status == "caught_up":
            assert rec.step >= version


@pytest.mark.parametrize("overlap", [False, True], ids=["", "overlap"])
def test_adam_with_two_parameter_groups_matches_the_reference(comm, backend, overlap):
    """Adam keeps more state than momentum (two moments and a step count per parameter), and two groups have
    their own hyper-parameters: all of it must travel with catch-ups and match the reference; also with the
    gradients leaving during backward(), one bucket per parameter (late ranks arrive mid-backward)."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()

    def adam(params):
        params = list(params)
        return torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "betas": (0.8, 0.99)}],
                                lr=1e-2, weight_decay=1e-4)

    model = make_model()
    start_params = initial(model)
    # Ranks take turns at being slow for a few steps: every rank drops, catches up and comes back.
    slow = Delays(lambda v: 0.05 if (v // 5) % size == rank else 0.0)
    with make_opt(model, backend, adam, backup_workers=1, overlap=overlap, bucket_cap_mb=1e-4) as opt:
        recorder = Recorder(opt, model)
        mine = train_until(opt, model, 40, slow, recorder=recorder)
        records = opt.pop_records()
    assert_matches_reference(comm, recorder, records, start_params, adam)
    assert any(rec.status in ("dropped", "caught_up") for _, rec in mine)


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
    start_params = initial(model)
    with make_opt(model, backend, backup_workers=b) as opt:
        recorder = Recorder(opt, model)
        mine = []
        while opt.global_step < steps:
            comm.Barrier()
            v = opt.global_step
            x, y = batch(v, rank)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            for group in opt.param_groups:
                group["lr"] = rank_lr(rank, len(mine))
            recorder.hand_in(model)
            time.sleep(delay[v])
            opt.step()
            mine.append(opt.last_step)
        records = opt.pop_records()
    assert_matches_reference(comm, recorder, records, start_params, sgd)
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
    timeout = 0.2
    injector = StragglerInjector(f"fixed:delay=1.5,rank={'/'.join(map(str, slow))}", rank=rank, size=size)
    model = make_model()
    start_params = initial(model)
    blocked = []
    with make_opt(model, backend, backup_workers=b, straggler_timeout=timeout, min_workers=min_workers) as opt:
        recorder = Recorder(opt, model)
        comm.Barrier()
        start = time.monotonic()

        class Timed:  # how long each step() blocks this rank
            def sleep(self, version):
                injector.sleep(version)
                blocked.append(time.monotonic())

        mine = train_until(opt, model, 5, Timed(), recorder=recorder)
        elapsed = time.monotonic() - start
        records = opt.pop_records()
        digest = state_digest(model, opt)
    assert_same_everywhere(comm, digest, "parameters and momentum")
    assert_matches_reference(comm, recorder, records, start_params, sgd)
    assert all(r.closed_by == "timeout" and min_workers <= r.count < size - b for r in records[1:]), records
    if rank not in slow:
        # After step 0 (which waits for every rank), each step closes about 0.2 s after the first arrival
        # instead of waiting 1.5 s for the slow ranks.
        assert elapsed < 1.5 + 4 * 1.0, f"5 steps took {elapsed:.2f}s"
        # ... and never before: the step closed at least `timeout` after its first arrival, and this rank
        # arrived arrival_s after that, having called step() before it arrived.
        returned = blocked[1:] + [start + elapsed]
        for (version, rec), called, back in zip(mine, blocked, returned):
            if rec.status == "included":
                waited = back - called
                assert waited >= timeout - rec.arrival_s[rank] - 0.01, (version, waited, rec.arrival_s)
    for r in records:  # the ranks that had not arrived learned of the close no sooner than the timeout
        assert all(s is None or s >= timeout - 0.01 for s in r.seen_s), r


def test_min_workers_holds_a_step_open_past_the_timeout(comm, backend):
    """The first arriver's timeout passes with fewer than min_workers = 2 arrivals: the step stays open until
    the second rank comes, three timeouts later, and closes with exactly those two (N = 2: both, which is
    everyone)."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    b = 0 if size == 2 else 1
    timeout = 0.15
    late = 3 * timeout  # rank 1, the second rank min_workers needs, arrives only after the timeout
    # Rank 0 at once; rank 1 after the timeout; the others (N = 4) long after the step must have closed.
    delay = {0: 0.0, 1: late}.get(rank, 2 * late)
    model = make_model()
    start_params = initial(model)
    with make_opt(model, backend, backup_workers=b, straggler_timeout=timeout, min_workers=2) as opt:
        recorder = Recorder(opt, model)
        train_until(opt, model, 3, Delays(lambda v: delay), barrier=comm.Barrier, recorder=recorder)
        records = opt.pop_records()
    assert_matches_reference(comm, recorder, records, start_params, sgd)
    for r in records[1:]:  # step 0 waits for every rank
        assert r.included == (0, 1), r
        assert r.arrival_s[1] >= timeout, r  # rank 1 really came after the timeout
        assert r.closed_by == ("all" if size == 2 else "timeout"), r


def test_auto_b_learns_to_drop_a_slow_rank_and_all_ranks_agree(comm, backend):
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    injector = StragglerInjector(f"fixed:delay=0.15,rank={size - 1}", rank=rank, size=size)
    model = make_model()
    start_params = initial(model)
    with make_opt(model, backend, backup_workers="auto", auto_every=8, max_backup_workers=1) as opt:
        recorder = Recorder(opt, model)
        records = []  # popped after every step, as the trainer does: the choice must not depend on it
        train_until(opt, model, 24, injector, popped=records, recorder=recorder)
        records += opt.pop_records()
        b_now = opt.backup_workers
    assert_same_everywhere(comm, [r.quorum for r in records], "the quorum of each step")
    assert_matches_reference(comm, recorder, records, start_params, sgd)
    assert [r.quorum for r in records[:8]] == [size] * 8  # starts synchronous
    assert all(r.quorum == size - 1 for r in records[8:]), [r.quorum for r in records]
    assert b_now == 1


def test_auto_b_decides_the_same_whoever_pops_the_records(comm, backend):
    """Rank 0 pops the step records after every step, the others never do: the choice of b still rests on
    the same window of steps everywhere. The last rank is slow in 6 of every 8 steps, so the window says b=1
    while the latest step alone would say b=0."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    slow_mostly = Delays(lambda v: 0.1 if rank == size - 1 and v % 8 < 6 else 0.0)
    model = make_model()
    start_params = initial(model)
    popped = []
    with make_opt(model, backend, backup_workers="auto", auto_every=8, max_backup_workers=1) as opt:
        recorder = Recorder(opt, model)
        train_until(opt, model, 8, slow_mostly, popped=popped if rank == 0 else None, recorder=recorder)
        b_now = opt.backup_workers
        popped += opt.pop_records()
    assert_same_everywhere(comm, b_now, "the chosen b")
    assert_matches_reference(comm, recorder, popped, start_params, sgd)
    assert [r.step for r in popped] == list(range(len(popped)))
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
    (dict(detach_after=0), "detach_after=0 must be None or an integer >= 1"),
    (dict(detach_after=2, backend="horovod"), "detach_after=2 needs backend 'mpi' .Horovod's allreduce cannot leave "
                                              "ranks out.. not 'horovod'"),
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


def test_a_late_rank_learns_the_close_from_a_notice(comm, backend):
    """The rank whose arrival completes a step tells the others at once (hvd_backup.protocol.notice): a late
    rank waiting for the close learns it from its own message queue, not from a round trip to the counter's
    host. The counter's word is still read every 5 ms, so a lost notice would only cost time."""
    need_ranks(comm, 2)
    size, rank = comm.Get_size(), comm.Get_rank()
    slow = size - 1
    model = make_model()
    start_params = initial(model)
    delays = Delays(lambda v: 0.05 if rank == slow else 0.0)
    with make_opt(model, backend, backup_workers=1) as opt:
        recorder = Recorder(opt, model)
        train_until(opt, model, 30, delays, recorder=recorder, lr=rank_lr)
        records = opt.pop_records()
        timings = opt.timings()
    assert_matches_reference(comm, recorder, records, start_params, sgd)
    if rank == slow:
        assert timings.get("close_notice", (0, 0))[1] >= 5, timings
