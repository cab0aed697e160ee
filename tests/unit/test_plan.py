"""The simulation, the planner and the adaptive choice of b, on cases whose answers are known."""

import json

import pytest

from hvd_backup.planning.plan import Workload, allreduce_seconds, exposed_seconds, main, parse_bandwidth, predict
from hvd_backup.planning.simulate import simulate
from hvd_backup.protocol.adaptive import AutoBackup
from hvd_backup.records import StepRecord


def test_simulation_waits_for_the_slowest_only_without_backup_workers():
    work = lambda r, v: 0.01 + (0.1 if r == 3 else 0.0)  # noqa: E731 - rank 3 is 10x slower
    assert simulate(4, 0, 10, work)["time"] == pytest.approx(1.1)
    one = simulate(4, 1, 10, work)
    assert one["time"] == pytest.approx(0.1) and all(inc == [0, 1, 2] for inc in one["included"])
    # A rank that misses a step restarts on the newest parameters: with b = 1 and two slow ranks, the slow ones
    # alternate and a step never waits longer than the second-slowest.
    two = simulate(4, 1, 10, lambda r, v: 0.01 if r < 2 else 0.05)
    assert max(two["step_times"]) <= 0.05 + 1e-9


def test_communication_terms():
    assert allreduce_seconds(1, 1e9, 1e9, 1e-6) == 0
    assert allreduce_seconds(4, 1e9, 1e9, 0) == pytest.approx(1.5)  # 2 (N-1)/N of the bytes
    assert allreduce_seconds(1024, 0, 1e9, 1e-6, "tree") == pytest.approx(20e-6)
    assert parse_bandwidth("100Gbit/s") == pytest.approx(12.5e9)
    with pytest.raises(ValueError, match="--bandwidth '12 parsecs'"):
        parse_bandwidth("12 parsecs")


def test_predictions_follow_the_order_statistic():
    workload = Workload(compute=0.1, straggler="fixed:delay=0.4,rank=0")
    assert predict(workload, 8, 0, steps=50, comm_s=0.01) == pytest.approx(0.51, rel=1e-6)
    assert predict(workload, 8, 1, steps=50, comm_s=0.01) == pytest.approx(0.11, rel=1e-6)


def test_planner_from_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    with open(trace, "w") as f:
        for step in range(60):  # rank 3 takes 0.2 s, the others 0.02 s; 5 ms of fixed cost per step
            compute = [0.02, 0.021, 0.022, 0.2 if step % 2 else None]
            f.write(json.dumps({"type": "step", "step": step, "size": 4, "count": 3, "step_s": 0.027,
                                "compute_s": compute}) + "\n")
    out = tmp_path / "plan.json"
    assert main(["--trace", str(trace), "--ranks", "4,64", "--json", str(out)]) == 0
    plans = json.loads(out.read_text())
    assert plans[0]["ranks"] == 4 and plans[0]["recommended_b"] == 1
    assert "fixed cost per step 5.0 ms (measured)" in capsys.readouterr().out


def test_planner_bad_input(tmp_path, capsys):
    assert main(["--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "hvd-backup-plan: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--compute", "0.1", "--ranks", "0"])


def _record(step, compute, quorum):
    n = len(compute)
    return StepRecord(step, n, quorum, tuple(range(quorum)), "quorum", "absent", 0.0, (), tuple(compute), 0.0,
                      quorum=quorum, rank_step_s=(max(c for c in compute if c is not None) + 0.005,) * n)


def test_auto_b_drops_a_slow_rank_and_keeps_everyone_otherwise():
    slow = [_record(s, [0.02, 0.021, 0.019, 0.3], 4) for s in range(20)]
    even = [_record(s, [0.02, 0.021, 0.019, 0.022], 4) for s in range(20)]
    auto = AutoBackup(4, every=10, b_min=0, b_max=2)
    assert auto.decide(slow, seed=1) == 1
    assert auto.decide(even, seed=1) == 0
    assert auto.decide(slow, seed=1) == auto.decide(slow, seed=1)  # every rank, same data, same answer


def test_auto_b_decides_every_few_steps_from_its_own_window():
    auto = AutoBackup(4, every=10, b_min=0, b_max=2)  # a window of 20 steps
    fast = [_record(s, [0.02, 0.021, 0.019, 0.022], 4) for s in range(10)]
    slow = [_record(s, [0.02, 0.021, 0.019, 0.3], 4) for s in range(10, 40)]
    answers = [auto.observe(r) for r in fast + slow]
    assert [s for s, b in enumerate(answers) if b is not None] == [9, 19, 29, 39]  # after steps 9, 19, ...
    assert [answers[s] for s in (9, 19, 29, 39)] == [0, 1, 1, 1]
    assert [r.step for r in auto.seen] == list(range(20, 40))


def test_overlap_hides_the_allreduce_behind_the_backward_pass_but_not_the_last_bucket():
    assert exposed_seconds(0.10, backward_s=0.04, tail_s=0.01) == pytest.approx(0.06)
    assert exposed_seconds(0.10, backward_s=0.20, tail_s=0.01) == pytest.approx(0.01)  # all hidden but the tail
    assert exposed_seconds(0.0, backward_s=0.20, tail_s=0.0) == 0.0


def test_planner_with_overlap_predicts_shorter_steps(capsys):
    flags = ["--compute", "0.1", "--ranks", "8", "--params", "25.6M", "--bandwidth", "1GB/s", "--steps", "50"]
    plain, overlapped = [], []
    for out, extra in ((plain, []), (overlapped, ["--overlap"])):
        assert main(flags + extra) == 0
        out.append(float(capsys.readouterr().out.split("allreduce ")[1].split(" ms")[0]))
    assert overlapped[0] < plain[0]
