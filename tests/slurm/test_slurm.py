"""The batch templates on a real (local, four-node) Slurm: full-size directives accepted by ``--test-only``,
tiny jobs that really run the MPI job through srun and mpirun and write metrics, and preemption that
checkpoints, requeues and resumes."""

import os
import re
import subprocess
import time

import pytest

from hvd_backup.train.checkpoint import latest_checkpoint
from tests.e2e.helpers import ROOT, read_metrics, write_imagefolder
from tests.slurm.cluster import LocalSlurm

TEMPLATES = ["imagenet.sh", "cifar10.sh", "bench.sh"]
# Each test: its job's submission and run (two waits of 120 s), or, for the first, installing and starting Slurm.
pytestmark = pytest.mark.deadline(300)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def sbatch(slurm, work, template, opts=(), args=(), env=None, wait=True, timeout=120):
    """Submit slurm/<template> from ``work`` (where logs/ is): sbatch ``opts``, trainer flags ``args``.
    With ``wait``, return once the job ended, its exit code as ``returncode`` (like ``sbatch --wait``, which
    polls too slowly for tests)."""
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    env = dict(HVD_BACKUP_ROOT=ROOT, VENV=os.path.join(ROOT, ".venv"), **(env or {}))
    argv = ["sbatch", "--parsable", *opts, os.path.join(ROOT, "slurm", template), *args]
    proc = slurm.run(argv, env=env, cwd=str(work), timeout=timeout)
    if not wait or proc.returncode != 0 or "--test-only" in opts:
        return proc
    job = proc.stdout.strip().split(";")[0]
    state, _, code = wait_job(slurm, job, timeout)
    return subprocess.CompletedProcess(argv, 0 if state == "COMPLETED" else code or 1, proc.stdout, proc.stderr)


def _job(slurm, job):
    out = slurm.run(["scontrol", "show", "job", job]).stdout
    field = lambda name: (re.search(rf"\b{name}=(\S+)", out) or [None, None])[1]  # noqa: E731
    code = field("ExitCode")
    return field("JobState") or "GONE", int(field("Restarts") or 0), int(code.split(":")[0]) if code else None


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE")


def wait_job(slurm, job, timeout):
    """Poll until the job completed or failed; returns (state, restarts, exit code). (A requeued job waits
    for its old credential to expire first: the local cluster sets that to 10 s.)"""
    deadline = time.monotonic() + timeout
    while True:
        state, restarts, code = _job(slurm, job)
        if state in FINAL_STATES:
            return state, restarts, code
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout}s"
        time.sleep(0.2)


# One CPU and one (fake) GPU per task; a 30-minute limit keeps the templates' --signal=B:USR1@600 quiet.
TINY = ["--cpus-per-task=1", "--gpus-per-node=1", "--time=30"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_full_size_directives_are_accepted(slurm, tmp_path, template):
    proc = sbatch(slurm, tmp_path, template, ["--test-only"], wait=False)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    n = re.search(r"using (\d+) processors on nodes (\S+)", proc.stderr)
    assert n, proc.stderr


def _job_log(work):
    logs = [os.path.join(work, "logs", f) for f in os.listdir(os.path.join(work, "logs")) if f.endswith(".out")]
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return f.read()


# srun with PMIx on one node (two slurmds on one host would share PMIx's temporary folder); mpirun across
# two "nodes", where Open MPI needs the UCX one-sided component (no shared memory between nodes, no RDMA).
@pytest.mark.parametrize("launcher,nodes", [("srun", 1), ("mpirun", 2)])
def test_imagenet_template_runs_a_tiny_job(slurm, tmp_path, launcher, nodes):
    data = write_imagefolder(tmp_path / "imagenet")
    env = dict(DATA_DIR=data, ARCH="resnet18", LAUNCHER=launcher, CHECKPOINT_DIR=str(tmp_path / "ck"),
               METRICS=str(tmp_path / "m.jsonl"), BACKUP_WORKERS="1", MPIRUN_ARGS="--mca osc ucx,sm")
    proc = sbatch(slurm, tmp_path, "imagenet.sh", [f"--nodes={nodes}", f"--ntasks-per-node={2 // nodes}", *TINY],
                  ["--image-size", "32", "--steps", "3", "-b", "2", "--workers", "0", "--eval-every", "0"], env=env)
    log = _job_log(tmp_path)
    assert proc.returncode == 0, proc.stderr + log
    assert f"{nodes} node(s), 2 ranks, launcher {launcher}" in log and "done: 3 steps" in log, log
    steps = [r for r in read_metrics(tmp_path / "m.jsonl") if r["type"] == "step"]
    assert [s["step"] for s in steps] == [0, 1, 2] and steps[0]["size"] == 2
    assert latest_checkpoint(str(tmp_path / "ck")).endswith("checkpoint-00000003.pt")


def test_cifar10_template_runs_a_tiny_job(slurm, tmp_path):
    from tests.e2e.helpers import write_cifar10

    data = write_cifar10(tmp_path / "cifar")
    env = dict(DATA_DIR=data, CHECKPOINT_DIR=str(tmp_path / "ck"), METRICS=str(tmp_path / "m.jsonl"))
    proc = sbatch(slurm, tmp_path, "cifar10.sh", ["--ntasks-per-node=2", *TINY],
                  ["--steps", "3", "-b", "4", "--workers", "0", "--eval-every", "0"], env=env)
    log = _job_log(tmp_path)
    assert proc.returncode == 0, proc.stderr + log
    assert sum(r["type"] == "step" for r in read_metrics(tmp_path / "m.jsonl")) == 3


def test_bench_template_runs_a_tiny_job(slurm, tmp_path):
    env = dict(ARCH="resnet18", IMAGE_SIZE="16", STEPS="4", BATCH_SIZE="2", BACKUPS="1", OUT=str(tmp_path / "out"),
               STRAGGLER="fixed:delay=0.05,rank=1")
    proc = sbatch(slurm, tmp_path, "bench.sh", ["--nodes=1", "--ntasks-per-node=2", *TINY],
                  ["--num-classes", "4", "--synthetic-size", "64", "--workers", "0"], env=env)
    log = _job_log(tmp_path)
    assert proc.returncode == 0, proc.stderr + log
    assert sorted(os.listdir(tmp_path / "out")) == ["backup-b1.jsonl", "sync.jsonl"]
    assert re.search(r"backup-b1\s+4\s", log), log  # the summary table


def preempt_and_resume(slurm, work, template, opts, args, env, steps):
    """Submit ``template`` (trainer flags ``args`` ending at ``steps``, with checkpoints), send it what
    ``--signal=B:USR1@T`` sends before the time limit once its first checkpoint exists, and check that it stops
    with a checkpoint, requeues itself and resumes from that step to the end (waits of 150 and 240 s). Returns
    the job's log."""
    ck = os.path.join(work, "ck")
    proc = sbatch(slurm, work, template, opts, [*args, "--steps", str(steps)],
                  env=dict(env, CHECKPOINT_DIR=ck, METRICS=os.path.join(work, "m.jsonl")), wait=False)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 150
    while not latest_checkpoint(ck):
        state = _job(slurm, job)
        if state[0] in FINAL_STATES or time.monotonic() > deadline:
            details = slurm.run(["scontrol", "show", "job", job]).stdout
            logs = os.path.join(work, "logs")
            log = _job_log(work) if os.listdir(logs) else "(no job log yet)"
            pytest.fail(f"no checkpoint before the preemption; job {state}:\n{details}\n{log}")
        time.sleep(0.2)
    signal = slurm.run(["scancel", "--signal=USR1", "--batch", job])
    assert signal.returncode == 0, signal.stderr
    state = wait_job(slurm, job, 240)
    assert state[0] == "COMPLETED", f"job {state}:\n{_job_log(work)}"  # a string: pytest shows all of it
    log = _job_log(work)
    assert state[1] >= 1, log
    assert "requeueing job" in log and re.search(r"stopped early at global step (\d+)", log), log
    stopped = int(re.search(r"stopped early at global step (\d+)", log).group(1))
    resumed = int(re.search(r"resumed from \S+ at global step (\d+)", log).group(1))
    assert resumed == stopped and 0 < stopped < steps, log
    assert latest_checkpoint(ck).endswith(f"checkpoint-{steps:08d}.pt")
    return log


@pytest.mark.deadline(540)
def test_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path):
    preempt_and_resume(slurm, str(tmp_path), "cifar10.sh", ["--ntasks-per-node=2", *TINY],
                       ["--dataset", "digits", "--arch", "digits_cnn", "-b", "32", "--checkpoint-every", "20",
                        "--workers", "0", "--eval-every", "0"], {}, steps=400)
