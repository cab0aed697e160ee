"""The clock with the gradient in buckets (overlap) and its three inclusion rules, and the per-bucket update of
the virtual cluster. Every expected value is worked out by hand or independently of the code under test."""

import json

import numpy as np
import pytest
import torch

from hvd_backup.planning.simulate import BucketSchedule, Inclusion, Schedule
from hvd_backup.planning.virtual import BucketTimes, Network, Overlap, VirtualJob, WorkTimes
from hvd_backup.planning.virtual.cli import main
from hvd_backup.train.config import parse_args

from tests.unit.digits_reference import digits_reference


def test_the_hand_in_at_step_is_the_planners_clock():
    # Inclusion.STEP with one or two buckets whose allreduces add up to the planner's communication time: the
    # same included ranks, close times and seconds as Schedule, on random work, k = N at step 0.
    for trial in range(60):
        rng = np.random.default_rng(trial)
        n = int(rng.integers(2, 7))
        k = int(rng.integers(1, n + 1))
        work = rng.lognormal(0, 1, size=(50, n))
        comm = float(rng.uniform(0, 0.5))
        plain = Schedule(n, lambda r, v: work[v % 50, r], comm_s=comm)
        one = BucketSchedule(n, lambda r, v: [work[v % 50, r]], [comm], Inclusion.STEP)
        two = BucketSchedule(n, lambda r, v: [0.3 * work[v % 50, r], work[v % 50, r]], [comm / 3, 2 * comm / 3],
                             Inclusion.STEP)
        for t in range(30):
            want, seconds = plain.close(n if t == 0 else k)
            for clock in (one, two):
                sets, got = clock.close(n if t == 0 else k)
                assert all(members == want for members in sets)
                assert clock.time == pytest.approx(plain.time)
                assert got == pytest.approx(seconds)


def _three_ranks(inclusion):
    # Two buckets, 0.1 s of allreduce each. Step 0: rank 0 has bucket 0 at 1.0 s, then pauses and has bucket 1
    # at 5.0 s; rank 1 has them at 1.5 and 2.0, rank 2 at 1.8 and 2.5. Every later gradient: 0.5 and 1.0 s
    # (rank 2: 0.9 and 1.0).
    def ready(rank, version):
        if version == 0:
            return {0: [1.0, 5.0], 1: [1.5, 2.0], 2: [1.8, 2.5]}[rank]
        return [0.9 if rank == 2 else 0.5, 1.0]

    return BucketSchedule(3, ready, [0.1, 0.1], inclusion)


def test_first_bucket_inclusion_waits_for_a_rank_that_paused_after_its_first_bucket():
    # k = 2. At the hand-in at step(): ranks 1 and 2 (whole gradients at 2.0 and 2.5), one allreduce of both
    # buckets after 2.5: 2.7. Decided at the first bucket: ranks 0 and 1 (1.0, 1.5); bucket 0 travels at 1.5
    # (done 1.6), bucket 1 when rank 0 has it, 5.0: done 5.1. Per bucket: bucket 0 ranks 0 and 1 (done 1.6),
    # bucket 1 ranks 1 and 2 (posted 2.5, done 2.6).
    expected = {Inclusion.STEP: ([[1, 2], [1, 2]], 2.7), Inclusion.FIRST: ([[0, 1], [0, 1]], 5.1),
                Inclusion.BUCKET: ([[0, 1], [1, 2]], 2.6)}
    for inclusion, (sets, end) in expected.items():
        clock = _three_ranks(inclusion)
        got, seconds = clock.close(2)
        assert got == sets and clock.time == pytest.approx(end), inclusion
        assert seconds == pytest.approx({rank: {0: 5.0, 1: 2.0, 2: 2.5}[rank] for rank in set(sum(sets, []))})


def test_per_bucket_a_late_rank_is_dropped_from_the_buckets_it_missed_and_starts_again_on_the_newest():
    # Per bucket, after step 0 (above, done at 2.6): ranks 1 and 2 start at 2.6 and have bucket 0 at 3.1 and
    # 3.5, bucket 1 at 3.6: step 1 is done at 3.7. Rank 0 is still computing (until 5.0). Step 2: from 3.7,
    # buckets at 4.2 / 4.6 and 4.7, done 4.8; rank 0 is not done before the step closes (4.7). Step 3: ranks 1
    # and 2 start at 4.8 (bucket 0 at 5.3 and 5.7, bucket 1 at 5.8); rank 0's gradient on version 0 is done at
    # 5.0, before step 3 closes: dropped, it starts on step 3's parameters then (buckets at 5.5 and 6.0), and is
    # in for bucket 0 (second, after rank 1) and out of bucket 1 (ranks 1 and 2 at 5.8): done at 5.9.
    clock = _three_ranks(Inclusion.BUCKET)
    clock.close(2)
    closes = []
    for _ in range(3):
        sets, seconds = clock.close(2)
        closes.append((sets, clock.time, seconds))
    assert [c[0] for c in closes] == [[[1, 2], [1, 2]], [[1, 2], [1, 2]], [[1, 0], [1, 2]]]
    assert [c[1] for c in closes] == pytest.approx([3.7, 4.8, 5.9])
    assert closes[2][2] == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0})  # its dropped 5 s gradient was replaced


def test_where_a_delay_falls_in_the_step():
    # 1 s of compute (a third forward), a 2 s delay; two buckets of 1 and 3 units: bucket 0 is done a quarter
    # into the backward pass.
    work = WorkTimes(2, compute=1.0, straggler="fixed:delay=2")
    share = [1 / 3 + 2 / 3 * 0.25, 1.0]
    start = BucketTimes(work, [1, 3], backward_fraction=2 / 3, delay_at="start")
    spread = BucketTimes(work, [1, 3], backward_fraction=2 / 3, delay_at="spread")
    assert start(0, 0) == pytest.approx([2 + share[0], 3.0])
    assert spread(0, 0) == pytest.approx([3 * share[0], 3.0])
    pause = BucketTimes(work, [1, 3], backward_fraction=2 / 3, delay_at="backward", seed=1)
    seen = {tuple(np.round(pause(rank, v), 9)) for rank in range(2) for v in range(40)}
    # A pause before bucket 0 is done delays both buckets; after it, only bucket 1: a quarter of the draws.
    assert seen == {tuple(np.round([2 + share[0], 3.0], 9)), tuple(np.round([share[0], 3.0], 9))}
    with pytest.raises(ValueError, match="delay_at='later'"):
        BucketTimes(work, [1, 3], delay_at="later")


def test_a_per_bucket_step_applies_each_buckets_mean_over_its_own_ranks():
    # 3 workers, b = 1, the digits CNN in two buckets (its last two parameters, then the rest). Rank 0 pauses
    # for 1 s somewhere in each backward pass, after its first bucket at step 1 (its drawn point): step 0 waits
    # for everyone; at step 1 ranks 0 and 1 are in for bucket 0 (a tie at the same time, broken by rank) and
    # ranks 1 and 2 for bucket 1. Computed here independently: each worker's gradients on its batches, the
    # means over those sets, two SGD steps with momentum and weight decay.
    cfg = parse_args(["--dataset", "digits", "-b", "8", "--seed", "3", "--mode", "backup", "--backup-workers", "1",
                      "--steps", "2", "--wd", "0.001"])
    work = WorkTimes(3, compute=0.01, straggler="fixed:delay=1,rank=0")
    overlap = Overlap(Inclusion.BUCKET, bucket_cap_mb=25.0, first_bucket_mb=0.004, delay_at="backward")
    job = VirtualJob(cfg, 3, work, Network(bandwidth=None), overlap=overlap)
    result = job.run()
    assert [list(g) for g in job.groups] == [[6, 7], [0, 1, 2, 3, 4, 5]]
    assert job.sets == [[[0, 1, 2], [0, 1, 2]], [[0, 1], [1, 2]]]
    assert job.included == [[0, 1, 2], [0, 1, 2]] and result["per_bucket_steps"] == 1

    model = digits_reference(cfg, 3, [[(0, 1, 2)] * 8, [(1, 2)] * 6 + [(0, 1)] * 2])
    for mine, theirs in zip(model.parameters(), job.model.parameters()):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-6)



def test_the_command_line_runs_each_inclusion_rule(tmp_path, capsys):
    out = tmp_path / "vc.json"
    code = main(["--ranks", "4", "--modes", "backup,async", "--backups", "1", "--compute", "10ms",
                 "--straggler", "exp:mean=0.01", "--steps", "6", "-b", "8", "--inclusion", "step,bucket",
                 "--bucket-cap-mb", "0.1", "--first-bucket-mb", "0.004", "--delay-at", "backward", "--out", str(out)])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["mode"], r.get("overlap", {}).get("inclusion")) for r in runs] == [
        ("backup", "step"), ("backup", "bucket"), ("async", None)]
    assert runs[1]["overlap"]["buckets"] == 3 and runs[1]["overlap"]["delay_at"] == "backward"
    assert main(["--ranks", "4", "--compute", "1", "--inclusion", "last"]) == 2
    assert "--inclusion 'last'" in capsys.readouterr().err
