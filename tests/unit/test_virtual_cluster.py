"""The virtual cluster keeps the real algorithms' semantics: who is included, what the update is, what staleness
counts. Every expected value here is worked out independently of the code under test."""

import json
import os

import numpy as np
import pytest
import torch

from hvd_backup.planning.simulate import Schedule, simulate
from hvd_backup.planning.virtual import AsyncSchedule, Network, VirtualJob, WorkTimes, trace_compute
from hvd_backup.planning.virtual.cli import main
from hvd_backup.train.config import parse_args
from hvd_backup.train.metrics import of_type, read_metrics

from tests.unit.digits_reference import digits_reference

QUIET = Network(bandwidth=None)  # no communication time


@pytest.fixture(autouse=True)
def one_thread():
    # Small models on a shared machine: a second thread only waits for a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def table_work(rows):
    """work(rank, version) = rows[version][rank], recording every (rank, version) started."""
    started = []

    def work(rank, version):
        started.append((rank, version))
        return rows[min(version, len(rows) - 1)][rank]

    return work, started


def test_a_step_takes_the_first_k_arrivals_and_a_late_worker_restarts_on_the_newest_parameters():
    # 3 workers, k = 2, 0.5 s of communication per step. Rank 2's first gradient takes 9.8 s: it finishes after
    # step 3's second arrival (9.5) but before that step's update exists (10.0), so it restarts at 10.0 on
    # version 4, and from then on needs 1.2 s; ranks 0 and 1 need 1 s and 2 s.
    def work(rank, version):
        return {0: 1.0, 1: 2.0}.get(rank, 9.8 if version == 0 else 1.2)

    clock = Schedule(3, work, comm_s=0.5)
    closes = []
    for _ in range(5):
        included, seconds = clock.close(2)
        closes.append((clock.time, included, seconds))
    # By hand: step 0 closes at 2.0 + 0.5 with ranks 0, 1; they restart at 2.5 and arrive at 3.5 and 4.5 (closes
    # at 5.0), then 6.0 and 7.0 (7.5), 8.5 and 9.5 (10.0). Rank 2's gradient on version 0 comes at 9.8: dropped.
    # Step 4: rank 0 at 11.0, rank 2 at 10.0 + 1.2 = 11.2, so 11.7; rank 1 (12.0) is dropped from it.
    assert [c[0] for c in closes] == pytest.approx([2.5, 5.0, 7.5, 10.0, 11.7])
    assert [c[1] for c in closes] == [[0, 1], [0, 1], [0, 1], [0, 1], [0, 2]]
    assert closes[3][2] == pytest.approx({0: 1.0, 1: 2.0})
    assert closes[4][2] == pytest.approx({2: 1.2, 0: 1.0})  # the gradient that counted, not the dropped one
    # Step 5: ranks 0 and 2 restarted at 11.7 and arrive at 12.7 and 12.9; rank 1's gradient on version 4 came
    # at 12.0, after step 4 closed: dropped (its seconds reported), restarted at once on version 5.
    included, seconds = clock.close(2)
    assert (clock.time, included) == (pytest.approx(13.4), [0, 2])
    assert seconds == pytest.approx({1: 2.0, 0: 1.0, 2: 1.2})


def test_included_sets_from_a_recorded_trace_follow_the_arrival_rule(tmp_path):
    # A trace in the trainer's format (3 ranks); step 0 (start-up) and steps after an evaluation are left out.
    rows = [[0.5, 0.5, 0.5], [0.01, 0.02, 0.06], [0.03, 0.01, 0.02], [0.02, 0.04, 0.015], [0.01, 0.02, 0.03]]
    path = tmp_path / "trace.jsonl"
    with open(path, "w") as f:
        for step, row in enumerate(rows):
            f.write(json.dumps({"type": "step", "step": step, "size": 3, "count": 3, "step_s": 0.1,
                                "included": [0, 1, 2], "compute_s": row}) + "\n")
    table, info = trace_compute(str(path))
    assert table.tolist() == rows[1:] and info["ranks"] == 3
    # Replayed with b = 1 (k = 2), no communication time, worked out by hand:
    #   step 0: ranks 0 (0.01) and 1 (0.02) arrive: closes at 0.02. Rank 2 is still on version 0 (until 0.06).
    #   step 1: ranks 0, 1 start at 0.02 and arrive at 0.05 and 0.03: closes at 0.05.
    #   step 2: rank 2's version-0 gradient comes at 0.06: dropped; it restarts at 0.06 and arrives at 0.075;
    #           rank 0 (0.05 + 0.02) arrives at 0.07, rank 1 (0.05 + 0.04) would at 0.09: closes at 0.075.
    #   step 3: rank 0 arrives at 0.085; rank 1's version-2 gradient (0.09) is dropped and restarts; rank 2
    #           (0.075 + 0.03) arrives at 0.105: closes at 0.105.
    result = simulate(3, 1, 4, WorkTimes(3, table=table))
    assert result["included"] == [[0, 1], [0, 1], [0, 2], [0, 2]]
    assert np.cumsum(result["step_times"]) == pytest.approx([0.02, 0.05, 0.075, 0.105])


def test_trace_delays_are_taken_out_and_drawn_again_step_by_step(tmp_path):
    from mpi_tools.straggler import StragglerInjector

    spec = "fixed:delay=0.1,rank=1"
    path = tmp_path / "trace.jsonl"
    with open(path, "w") as f:
        for step in range(5):
            f.write(json.dumps({"type": "step", "step": step, "size": 2, "count": 2, "step_s": 0.2,
                                "included": [0, 1], "compute_s": [0.01, 0.11]}) + "\n")
    table, _ = trace_compute(str(path), straggler=spec)
    assert np.allclose(table, 0.01)
    work = WorkTimes(2, table=table, straggler=spec)
    assert work(0, 3) == pytest.approx(0.01) and work(1, 3) == pytest.approx(0.11)
    lognormal = WorkTimes(3, compute=0.02, straggler="lognormal:median=0.02,sigma=1", seed=7)
    trainer_draw = StragglerInjector("lognormal:median=0.02,sigma=1", rank=2, size=3, seed=7).delay(11)
    assert lognormal(2, 11) == pytest.approx(0.02 + trainer_draw)  # the trainer's own delay for that step


def test_async_staleness_counts_the_updates_between_read_and_write():
    # Rank 0 needs 1 s per gradient, rank 1 needs 2.5 s; no communication time. By hand, landings in order:
    #   t=1.0 rank 0 (read v0, written 0, staleness 0)   t=2.0 rank 0 (read v1, written 1, 0)
    #   t=2.5 rank 1 (read v0, written 2, 2)             t=3.0 rank 0 (read v2, written 3, 1)
    #   t=4.0 rank 0 (read v4, written 4, 0)             t=5.0 rank 1 (read v3 at 2.5, written 5, 2)
    # total = 5: a worker that reads version 5 or later stops; rank 1's update under way still lands.
    landed, reads = [], []
    end = AsyncSchedule(2, lambda rank, v: (1.0, 2.5)[rank]).run(
        5, read=lambda rank, v: reads.append((rank, v)), land=lambda *a: landed.append(a))
    assert [(r, v, w) for r, v, w, _ in landed] == [(0, 0, 0), (0, 1, 1), (1, 0, 2), (0, 2, 3), (0, 4, 4), (1, 3, 5)]
    assert [t for *_, t in landed] == pytest.approx([1.0, 2.0, 2.5, 3.0, 4.0, 5.0])
    assert end == pytest.approx(5.0)
    assert reads == [(0, 0), (1, 0), (0, 1), (0, 2), (1, 3), (0, 4)]


def test_async_pushes_and_pulls_go_through_the_roots_links_one_at_a_time():
    landed = []
    AsyncSchedule(3, lambda rank, v: 1.0, move_s=0.5, update_s=0.1).run(3, land=lambda *a: landed.append(a))
    # All three are ready at 1.0; the inbound link takes them one after another.
    assert [t for *_, t in landed[:3]] == pytest.approx([1.5, 2.0, 2.5])


def _cfg(*flags):
    return parse_args(["--dataset", "digits", "-b", "8", "--seed", "3", *flags])


TRACES = os.path.join(os.path.dirname(__file__), "..", "data", "virtual")  # how they were made: README.md there


def _replay(name, n, *flags, straggler=None):
    """The real run ``name`` (its flags) on ``n`` virtual workers whose compute times are its trace's, the
    injected delays drawn again; returns the run's step records and the virtual job after it ran."""
    path = os.path.join(TRACES, f"{name}.jsonl")
    cfg = parse_args(["--dataset", "digits", "-b", "16", "--steps", "30", "--seed", "1", *flags]
                     + (["--straggler", straggler] if straggler else []))
    table, info = trace_compute(path, straggler=straggler, seed=1)
    job = VirtualJob(cfg, n, WorkTimes(n, table=table, straggler=straggler, seed=1),
                     Network(overhead_s=info["overhead_s"], bandwidth=None))
    job.run()
    return of_type(read_metrics(path), "step"), job


def test_sync_takes_the_same_steps_as_a_real_sync_run():
    # A real 4-rank --mode sync run (hvd.DistributedOptimizer): every step includes everyone and is the mean of
    # the 4 gradients. Its metrics record rank 0's loss at every step: the virtual worker 0's loss at each step
    # is the same to float rounding only if every earlier update (mean, learning rate, momentum, weight decay)
    # and every batch were the same.
    real, job = _replay("sync-n4", 4, "--mode", "sync")
    assert job.included == [[0, 1, 2, 3]] * 30
    assert [losses[0] for losses in job.losses] == pytest.approx([r["loss"] for r in real], abs=1e-5)


def test_backup_workers_take_the_same_steps_as_a_real_run_on_its_recorded_trace():
    # A real 3-rank run with b = 1: rank 2 is 0.25 s slow at every step, rank 1 now and then 1 s slow, so steps
    # close with ranks [0, 1] or [0, 2], and late gradients are dropped and their ranks restart on the newest
    # parameters. Step 0 waits for every rank (the protocol's start-up). The metrics record each step's
    # included ranks and the mean of their losses. Replayed on the virtual clock, the first 17 steps have the
    # same included sets and the same losses: the same batches taken by every worker, the same updates (the
    # mean over the included, not over N). At step 17 rank 1 came back from its 1 s delay within milliseconds
    # of what the virtual clock puts it at, and took a later batch than the clock does: from there on the two
    # runs follow different histories, yet they still agree on 28 of the 30 included sets.
    real, job = _replay("backup-n3-b1", 3, "--mode", "backup", "--backup-workers", "1",
                        straggler="fixed:delay=0.25,rank=2+tail:p=0.3,delay=1,rank=1")
    included = [sorted(r["included"]) for r in real]
    assert job.included[:17] == included[:17]
    assert {tuple(s) for s in included[:17]} == {(0, 1, 2), (0, 1), (0, 2)}
    assert sum(a == b for a, b in zip(job.included, included)) >= 27
    mean = [sum(losses.values()) / len(losses) for losses in job.losses]
    assert mean[:17] == pytest.approx([r["loss"] for r in real[:17]], abs=1e-5)


def test_a_backup_step_applies_the_mean_of_the_included_gradients():
    # 4 workers, b = 1, rank 2 slow by 1 s. Step 0 waits for everyone (start-up); step 1 includes ranks 0, 1, 3
    # (rank 2's second gradient is still a second away). Computed here independently: each worker's own
    # gradients on its first and second batches, their means, two SGD steps with momentum and weight decay at
    # the schedule's first two learning rates.
    cfg = _cfg("--mode", "backup", "--backup-workers", "1", "--steps", "2", "--wd", "0.001")
    work = WorkTimes(4, compute=0.01, straggler="fixed:delay=1,rank=2")
    job = VirtualJob(cfg, 4, work, QUIET)
    result = job.run()
    assert job.included == [[0, 1, 2, 3], [0, 1, 3]]
    assert result["dropped_per_rank"] == [0, 0, 1, 0]

    model = digits_reference(cfg, 4, [[(0, 1, 2, 3)] * 8, [(0, 1, 3)] * 8])
    for mine, theirs in zip(model.parameters(), job.model.parameters()):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-6)


def test_sync_is_backup_with_no_backup_workers():
    work = dict(compute=0.01, straggler="lognormal:median=0.02,sigma=1")
    sync = VirtualJob(_cfg("--mode", "sync", "--steps", "12", "--eval-every", "4"), 4, WorkTimes(4, **work), QUIET)
    zero = VirtualJob(_cfg("--mode", "backup", "--backup-workers", "0", "--steps", "12", "--eval-every", "4"), 4,
                      WorkTimes(4, **work), QUIET)
    a, b = sync.run(), zero.run()
    assert a["evals"] == b["evals"] and a["time_s"] == b["time_s"]
    for p, q in zip(sync.model.parameters(), zero.model.parameters()):
        assert torch.equal(p, q)


def test_async_on_one_worker_is_plain_sgd_with_momentum():
    # One worker: no staleness, and its momentum on its own gradients is torch's SGD with momentum.
    flags = ("--steps", "15", "--wd", "0.001")
    a = VirtualJob(_cfg("--mode", "async", *flags), 1, WorkTimes(1, compute=0.01), QUIET)
    s = VirtualJob(_cfg("--mode", "sync", *flags), 1, WorkTimes(1, compute=0.01), QUIET)
    result = a.run()
    s.run()
    assert result["mean_staleness"] == 0 and result["updates"] == 15
    for p, q in zip(a.model.parameters(), s.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_the_command_line_writes_every_run(tmp_path, capsys):
    out = tmp_path / "vc.json"
    code = main(["--ranks", "4", "--modes", "sync,backup,async", "--backups", "1,50%", "--compute", "10ms",
                 "--straggler", "exp:mean=0.01", "--steps", "6", "-b", "8", "--target", "0.5", "--out", str(out)])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["mode"], r["backup_workers"]) for r in runs] == [("sync", 0), ("backup", 1), ("backup", 2),
                                                                ("async", 0)]
    assert "N=4" in capsys.readouterr().out
    assert main(["--ranks", "4", "--modes", "fast", "--compute", "1"]) == 2
