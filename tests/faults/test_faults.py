"""What real clusters do to a job, done to the real trainer on 4 ranks: slow ranks, a rank killed or frozen,
a crash while a checkpoint is written, a crash and resume, a rank past --max-lag, and a long soak. Every case
has a deadline (tests/conftest.py) above the sum of its own waits."""

import os
import re
import signal
import statistics
import time

import pytest
import torch

from hvd_backup.train.checkpoint import latest_checkpoint, load_checkpoint
from mpi_tools.launch import finish, rank_pids
from tests.e2e.helpers import background, last_step, launch, read_metrics, summary, wait_until

NP = 4
DIGITS = {"arch": "digits_cnn", "dataset": "digits", "num_classes": 10}
FOREVER = ["--epochs", "10000"]  # a run that is still going when the test strikes


def steps_of(path):
    return [r for r in read_metrics(path) if r["type"] == "step"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_more_than_b_slow_ranks_close_on_the_timeout(tmp_path):
    m = tmp_path / "m.jsonl"
    proc = launch(NP, ["--backup-workers", "1", "--straggler-timeout", "0.05", "--min-workers", "2",
                       "--straggler", "fixed:delay=0.3,rank=2/3", "--metrics", str(m)], timeout=200)
    assert proc.returncode == 0, proc.stdout
    steps = steps_of(m)
    # Step 0 waits for every rank. After it, a slow rank that caught up now and then arrives within a step's
    # 50 ms window (closed by the quorum then); every other step closes on the timeout, never below min_workers.
    assert all(s["count"] >= 2 for s in steps)
    assert sum(s["closed_by"] == "timeout" for s in steps[1:]) >= 0.9 * (len(steps) - 1)
    assert statistics.median(s["step_s"] for s in steps) < 0.3  # closes on time, not when the slow ranks come
    assert summary(m)["final_top1"] >= 0.95
    print(f"{len(steps)} steps closed on the timeout with {min(s['count'] for s in steps)}-"
          f"{max(s['count'] for s in steps)} of 4 ranks; top-1 {summary(m)['final_top1']:.4f}")


@pytest.mark.deadline(220)
def test_a_rank_far_behind_keeps_up_with_flat_memory(tmp_path):
    """Rank 3 is 50x slower than the others (it sleeps 49x its own compute time): each of its gradients comes
    tens of steps late, and its memory must not grow with how far behind it is (one consensus copy, whatever
    the lag)."""
    total = 120  # global steps: a few catch-ups at about 30 steps each
    m = tmp_path / "m.jsonl"
    args = ["--dataset", "synthetic", "--image-size", "16", "--num-classes", "10", "--synthetic-size", "4096",
            "--arch", "mobilenet_v3_small", "-b", "8", "--steps", str(total), "--straggler", "slow:factor=50,rank=3",
            "--max-lag", "100000", "--metrics", str(m)]
    proc = background(NP, args, tmp_path / "log")
    pids, samples = {}, []
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if len(pids) < NP:  # ranks start one by one
            pids = rank_pids(proc)
        try:
            samples.append((last_step(m), {r: rss_mb(p) for r, p in pids.items()}))
        except (OSError, StopIteration):
            pass
        time.sleep(0.2)
    assert finish(proc, 5) == 0, (tmp_path / "log").read_text()
    steps = steps_of(m)
    assert sum(3 in s["dropped"] for s in steps) >= 0.9 * len(steps)
    # How far behind it was: rank 3 reports its stale gradient's compute time in the step after each catch-up.
    caught_up = [s["step"] for s in steps if s["compute_s"][3] is not None]
    lags = [b - a for a, b in zip(caught_up, caught_up[1:])]
    assert lags and max(lags) >= 20, caught_up
    # Memory of the slow rank: from its second catch-up on (consensus copy made and used), it must neither grow
    # with its lag nor rise and fall with it. Up to the last step's record: then every rank runs the final
    # evaluation, which takes memory of its own.
    late = [rss[3] for step, rss in samples if caught_up[1] <= step < total - 1 and 3 in rss]
    assert len(late) >= 5, samples
    print(f"rank 3 caught up after {lags} steps; its RSS in {len(late)} samples from step {caught_up[1]} to "
          f"{total - 2}: {min(late):.0f} to {max(late):.0f} MB; rank 0 ends at {samples[-1][1][0]:.0f} MB")
    assert max(late) - min(late) < 0.05 * min(late) + 20, late


def _hang_case(tmp_path, sig, options=(), rank=2, shm=True):
    """Start a long run, hit ``rank`` with ``sig`` at step 15; return (exit code, seconds to exit, output)."""
    m = tmp_path / "m.jsonl"
    ck = tmp_path / "ck"
    args = ["--backup-workers", "1", "--hang-timeout", "5", "--checkpoint-dir", str(ck), "--checkpoint-every", "5",
            "--metrics", str(m), *FOREVER]
    proc = background(NP, args, tmp_path / "log", options=options, shm=shm)
    wait_until(lambda: last_step(m) >= 15 and latest_checkpoint(str(ck)), proc, 120, "step 15")
    os.kill(rank_pids(proc)[rank], sig)
    struck = time.monotonic()
    code = finish(proc, 5 + 60)
    took = time.monotonic() - struck
    print(f"signal {sig!r} to rank {rank} at step >= 15: the job exited with {code} after {took:.1f}s "
          f"(hang_timeout=5s{'' if shm else ', TCP only'})")
    return code, took, (tmp_path / "log").read_text(), ck


def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_loads(tmp_path):
    code, took, out, ck = _hang_case(tmp_path, signal.SIGKILL)
    assert code not in (0, 124) and took < 5 + 30, (code, took, out)
    assert re.search(r"process rank 2 .* exited on signal 9", out), out  # mpirun names it at once
    assert load_checkpoint(latest_checkpoint(str(ck)), expect=DIGITS)["global_step"] >= 5


def test_a_killed_rank_is_named_by_the_hang_error_when_the_launcher_keeps_going(tmp_path):
    # Like srun's default: the launcher does not end the job when one task dies; our hang_timeout must.
    code, took, out, ck = _hang_case(tmp_path, signal.SIGKILL, options=("--mca", "orte_abort_on_non_zero_status", "0"))
    assert code not in (0, 124) and took < 5 + 30, (code, took, out)
    assert re.search(r"step \d+: ranks \[2\] did not contribute within hang_timeout=5s", out), out
    assert load_checkpoint(latest_checkpoint(str(ck)), expect=DIGITS)["global_step"] >= 5


def test_a_frozen_rank_is_named_by_the_hang_error(tmp_path):
    code, took, out, _ = _hang_case(tmp_path, signal.SIGSTOP)
    assert code not in (0, 124) and took < 5 + 30, (code, took, out)
    lines = re.findall(r"hvd_backup: rank (\d): step (\d+): ranks \[2\] did not contribute within hang_timeout=5s", out)
    assert {rank for rank, _ in lines} <= {"0", "1", "3"} and lines, out


def test_a_frozen_counter_host_over_tcp_ends_every_other_rank(tmp_path):
    # Without shared memory every counter operation needs rank 0's progress: the others' communication threads
    # block inside MPI, most of them between steps, before taking their rank's next gradient. Each rank's
    # watchdog times the step from that hand-in, gives up on a diagnosis (up to 10 s) and ends the job.
    code, took, out, ck = _hang_case(tmp_path, signal.SIGSTOP, rank=0, shm=False)
    assert code not in (0, 124) and took < 5 + 45, (code, took, out)
    blocked = set(re.findall(r"hvd_backup: rank (\d): step \d+: did not complete within hang_timeout=5s, and this "
                             r"rank's communication thread is blocked inside MPI \(the counter host rank 0\b", out))
    assert blocked and blocked <= {"1", "2", "3"}, out
    assert load_checkpoint(latest_checkpoint(str(ck)), expect=DIGITS)["global_step"] >= 5


@pytest.mark.deadline(270)
def test_a_crash_while_rank_0_writes_a_checkpoint_keeps_the_previous_one(tmp_path):
    ck = tmp_path / "ck"
    args = ["--dataset", "synthetic", "--image-size", "16", "--num-classes", "10", "--arch", "resnet18", "-b", "4",
            "--backup-workers", "1", "--checkpoint-dir", str(ck), "--checkpoint-every", "4", "--hang-timeout", "30",
            *FOREVER]
    proc = background(NP, args, tmp_path / "log")
    wait_until(lambda: latest_checkpoint(str(ck)), proc, 150, "a first checkpoint")
    wait_until(lambda: any(".tmp-" in n for n in os.listdir(ck)), proc, 60, "a checkpoint being written")
    os.kill(rank_pids(proc)[0], signal.SIGKILL)
    finish(proc, 30)
    assert any(".tmp-" in n for n in os.listdir(ck)), "the kill came after the write finished"
    previous = latest_checkpoint(str(ck))
    state = load_checkpoint(previous, expect={"arch": "resnet18", "dataset": "synthetic", "num_classes": 10})
    assert state["global_step"] % 4 == 0 and state["global_step"] >= 4


@pytest.mark.deadline(420)
def test_crash_then_resume_equals_an_uninterrupted_run(tmp_path):
    common = ["--backup-workers", "0", "--steps", "30", "--checkpoint-every", "10", "--keep-checkpoints", "10",
              "--seed", "3", "--straggler", "exp:mean=0.005"]
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    proc = launch(NP, common + ["--checkpoint-dir", str(whole)], timeout=120)
    assert proc.returncode == 0, proc.stdout
    m = tmp_path / "m.jsonl"
    proc = background(NP, common + ["--checkpoint-dir", str(crashed), "--metrics", str(m)], tmp_path / "log")
    wait_until(lambda: last_step(m) >= 11 and latest_checkpoint(str(crashed)), proc, 120, "step 11")
    os.kill(rank_pids(proc)[1], signal.SIGKILL)
    finish(proc, 30)
    assert not os.path.exists(crashed / "checkpoint-00000030.pt")
    resumed = tmp_path / "resumed.jsonl"
    proc = launch(NP, common + ["--checkpoint-dir", str(crashed), "--resume", "--metrics", str(resumed)], timeout=120)
    assert proc.returncode == 0, proc.stdout
    # It went on from the newest checkpoint (same b = 0 and seeds: a run from scratch would end the same).
    found = re.search(r"resumed from \S*checkpoint-(\d+)\.pt at global step (\d+)", proc.stdout)
    assert found and int(found[1]) == int(found[2]) >= 10, proc.stdout
    assert [s["step"] for s in steps_of(resumed)] == list(range(int(found[2]), 30))
    a = torch.load(whole / "checkpoint-00000030.pt", weights_only=True)
    b = torch.load(crashed / "checkpoint-00000030.pt", weights_only=True)
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0, msg=name)


def test_max_lag_fails_a_rank_too_far_behind_and_says_so(tmp_path):
    """--max-lag 3 and a rank that sleeps 1 s per gradient while the others (b = 1) go on: it fails as soon as
    it is 4 steps behind, naming itself, its lag and the limit; the job ends non-zero."""
    proc = launch(2, ["--backup-workers", "1", "--max-lag", "3", "--straggler", "fixed:delay=1,rank=1",
                      "--steps", "200"], timeout=120)
    assert proc.returncode not in (0, 124), proc.stdout
    assert re.search(r"hvd_backup: rank 1: rank 1: its training thread is 4 steps behind at step \d+, "
                     r"more than max_lag=3", proc.stdout), proc.stdout
    assert "done: 200 steps" not in proc.stdout


@pytest.mark.deadline(330)
def test_soak_1000_steps_of_heavy_tailed_delays(tmp_path):
    m = tmp_path / "m.jsonl"
    start = time.monotonic()
    proc = launch(NP, ["--backup-workers", "1", "--steps", "1000", "--straggler", "lognormal:median=0.002,sigma=1.5",
                       "--verify-every", "100", "--eval-every", "500", "--print-freq", "500", "--metrics", str(m)],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout
    print(f"soak: 1000 steps in {time.monotonic() - start:.0f}s, final top-1 {summary(m)['final_top1']:.4f}")
    records = read_metrics(m)
    steps = [r for r in records if r["type"] == "step"]
    assert [s["step"] for s in steps] == list(range(1000))
    assert all(s["count"] == NP - 1 and len(s["included"]) == NP - 1 for s in steps[1:])  # step 0 waits for all
    verified = [r["step"] for r in records if r["type"] == "verify" and r["ok"]]
    assert verified == list(range(100, 1001, 100)), verified
