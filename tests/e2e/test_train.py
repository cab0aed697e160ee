"""The trainer end to end, on real ranks launched by mpirun."""

import os
import re
import sys

import pytest
import torch

from .helpers import ROOT, launch, read_metrics, summary, write_cifar10, write_imagefolder


@pytest.fixture
def without_horovod(tmp_path):
    """The environment of a machine without Horovod: ``import horovod`` fails on every rank."""
    blocker = tmp_path / "no-horovod" / "horovod"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("no Horovod on this machine (the test hides it)")\n')
    return {"PYTHONPATH": os.pathsep.join([str(blocker.parent), ROOT, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("np_,backend,overlap", [(2, "mpi", False), (4, "horovod", True)])
def test_digits_reaches_95_percent_with_a_slow_rank(tmp_path, np_, backend, overlap, without_horovod):
    """With each backend; ``--backend mpi`` on a machine without Horovod (it must not need it); on Horovod's,
    with the gradients handed in during the backward pass (``--overlap``, small buckets)."""
    metrics = tmp_path / "m.jsonl"
    slow = np_ - 1
    args = ["--backend", backend, "--backup-workers", "1", "--straggler", f"fixed:delay=0.15,rank={slow}",
            "--metrics", str(metrics), "--print-freq", "20",
            *(["--overlap", "--bucket-cap-mb", "0.01"] if overlap else [])]
    proc = launch(np_, args, env=without_horovod if backend == "mpi" else None)
    assert proc.returncode == 0, proc.stdout
    s = summary(metrics)
    assert s["final_top1"] >= 0.95, s
    steps = [r for r in read_metrics(metrics) if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(s["steps"]))
    assert all(r["count"] == np_ - 1 for r in steps[1:])  # step 0 waits for every rank
    assert s["dropped_counts"][slow] >= 0.8 * s["steps"], s["dropped_counts"]
    assert "step       0 | loss" in proc.stdout  # the fixed-format line


def test_cifar10_on_disk_format(tmp_path):
    root = write_cifar10(tmp_path / "cifar")
    metrics = tmp_path / "m.jsonl"
    proc = launch(2, ["--dataset", "cifar10", "--data", root, "--steps", "3", "-b", "4", "--workers", "1",
                      "--metrics", str(metrics)])
    assert proc.returncode == 0, proc.stdout
    final = [r for r in read_metrics(metrics) if r["type"] == "eval"][-1]
    assert final["samples"] == 20 and final["top5"] is not None


def test_imagenet_folder_of_jpegs(tmp_path):
    root = write_imagefolder(tmp_path / "imagenet")
    metrics = tmp_path / "m.jsonl"
    proc = launch(2, ["--dataset", "imagenet", "--data", root, "--arch", "resnet18", "--image-size", "32",
                      "--steps", "3", "-b", "2", "--workers", "1", "--eval-every", "2", "--metrics", str(metrics),
                      "--overlap", "--bucket-cap-mb", "4"])  # a convolutional model's buckets too
    assert proc.returncode == 0, proc.stdout
    evals = [r for r in read_metrics(metrics) if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 3] and all(e["samples"] == 9 for e in evals)
    assert evals[0]["top5"] is None  # 3 classes: top-5 means nothing


def test_synthetic_with_sync_mode_as_the_readme_runs_it(tmp_path):
    """README: ``mpirun -np 4 --oversubscribe hvd-backup-train --backend mpi --mode sync`` (here on 2 ranks, a
    small synthetic data set): plain synchronous SGD, every rank in every step."""
    metrics = tmp_path / "m.jsonl"
    console_script = os.path.join(os.path.dirname(sys.executable), "hvd-backup-train")
    proc = launch(2, ["--backend", "mpi", "--mode", "sync", "--dataset", "synthetic", "--image-size", "16",
                      "--num-classes", "4", "--synthetic-size", "64", "--arch", "resnet18", "--steps", "4", "-b", "4",
                      "--metrics", str(metrics)], program=[console_script])
    assert proc.returncode == 0, proc.stdout
    steps = [r for r in read_metrics(metrics) if r["type"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3] and all(r["count"] == 2 for r in steps)
    assert summary(metrics)["mode"] == "sync"


@pytest.mark.deadline(3 * 180 + 30)  # three runs, each within launch()'s 180 s
def test_resume_with_b0_reaches_the_same_parameters_and_evaluate_scores_it(tmp_path):
    """Resuming from the step-6 checkpoint of a 12-step run gives the parameters of the uninterrupted run; then
    ``--evaluate --resume`` scores the step-12 checkpoint exactly as the run's final evaluation did."""
    common = ["--backup-workers", "0", "--steps", "12", "--checkpoint-every", "6", "--keep-checkpoints", "5",
              "--straggler", "exp:mean=0.01"]
    a, b = tmp_path / "a", tmp_path / "b"
    trained, evaluated = tmp_path / "trained.jsonl", tmp_path / "evaluated.jsonl"
    proc = launch(2, common + ["--checkpoint-dir", str(a), "--metrics", str(trained)])
    assert proc.returncode == 0, proc.stdout
    proc = launch(2, common + ["--checkpoint-dir", str(b), "--resume", str(a / "checkpoint-00000006.pt")])
    assert proc.returncode == 0, proc.stdout
    assert "resumed from" in proc.stdout and "at global step 6" in proc.stdout
    whole = torch.load(a / "checkpoint-00000012.pt", weights_only=True)
    resumed = torch.load(b / "checkpoint-00000012.pt", weights_only=True)
    for name, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0, msg=name)
    assert resumed["optimizer"]["hvd_backup"] == {"global_step": 12}
    proc = launch(2, ["--evaluate", "--resume", str(a / "checkpoint-00000012.pt"), "--metrics", str(evaluated)])
    assert proc.returncode == 0, proc.stdout
    assert re.search(r"eval step\s+12 \| top1 ", proc.stdout) and "step       0 | loss" not in proc.stdout, proc.stdout
    final = [r for r in read_metrics(trained) if r["type"] == "eval"][-1]
    records = read_metrics(evaluated)
    assert [r["type"] for r in records] == ["eval"], records  # no training step
    assert (records[0]["step"], records[0]["top1"], records[0]["samples"]) == (12, final["top1"], final["samples"])
    assert records[0]["loss"] == pytest.approx(final["loss"], rel=1e-6)


def test_async_trains_digits_and_reports_staleness(tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = launch(4, ["--mode", "async", "--metrics", str(metrics), "--print-freq", "1000"])
    assert proc.returncode == 0, proc.stdout
    assert summary(metrics)["final_top1"] >= 0.95
    staleness = [r["staleness"] for r in read_metrics(metrics) if r["type"] == "step"]
    assert staleness and min(staleness) >= 0 and sum(staleness) / len(staleness) > 0.5  # others did write between


def test_auto_backup_workers_from_the_command_line(tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = launch(4, ["--backup-workers", "auto", "--auto-every", "10", "--max-backup-workers", "1", "--steps", "40",
                      "--straggler", "fixed:delay=0.1,rank=3", "--metrics", str(metrics)])
    assert proc.returncode == 0, proc.stdout
    quorum = [r["quorum"] for r in read_metrics(metrics) if r["type"] == "step"]
    assert quorum[:10] == [4] * 10 and set(quorum[10:]) == {3}

