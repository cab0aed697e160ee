"""The batch templates on a Slurm whose nodes are emulated hosts: slurmctld on h3, a slurmd on each of h1 and h2
(own NodeName, NodeHostname and NodeAddr), tiny jobs across both through ``srun --mpi=pmix`` and ``mpirun``, and a
preempted job that checkpoints, requeues and resumes across both."""

import pytest

from hvd_backup.train.checkpoint import latest_checkpoint
from hvd_backup.train.metrics import of_type, read_metrics
from tests.e2e.helpers import write_imagefolder
from tests.multihost.conftest import JOB_DEADLINE
from tests.slurm.cluster import LocalSlurm
from tests.slurm.test_slurm import TINY, _job_log, preempt_and_resume, sbatch


@pytest.fixture(scope="module")
def slurm(cluster, tmp_path_factory):
    local = LocalSlurm(str(tmp_path_factory.mktemp("slurm")), nodes=[cluster["h1"], cluster["h2"]],
                       head=cluster["h3"])
    try:
        local.start()
        yield local
    finally:
        local.stop()


def test_nodes_are_the_emulated_hosts(slurm):
    out = slurm.run(["srun", "-N2", "--ntasks-per-node=1", "sh", "-c", "echo $(hostname) $SLURMD_NODENAME"])
    assert sorted(out.stdout.split("\n")) == ["", "h1 h1", "h2 h2"], out.stdout + out.stderr


def _env(cluster, **more):
    """What a user of this cluster exports before sbatch: MPI on the cluster's network, one-sided MPI over UCX."""
    return dict(cluster.mpi_environment(), OMPI_MCA_osc="ucx", **more)


# One job per launcher, one rank per node (the jobs on 2 ranks per host are in test_launchers and test_faults):
# srun starts the ranks itself (PMIx), mpirun starts its daemons through srun. The srun job is also the one that
# is preempted (a job start costs about as much as the rest of a tiny job).
@pytest.mark.deadline(420)  # preempt_and_resume's waits (150 + 240 s)
def test_cifar10_template_through_srun_pmix_preempted_requeued_and_resumed(slurm, cluster, tmp_path):
    plugins = slurm.run(["srun", "--mpi=list"])
    assert "pmix" in plugins.stdout + plugins.stderr, plugins
    # Slurm signals the batch shell on h1, which passes SIGUSR1 to srun, which passes it to the rank on each host.
    steps = 60  # at least 40 after the first checkpoint: the signal must find the job running
    log = preempt_and_resume(slurm, str(tmp_path), "cifar10.sh", ["--nodes=2", "--ntasks-per-node=1", *TINY],
                             ["--dataset", "digits", "--arch", "digits_cnn", "-b", "32", "--checkpoint-every",
                              "10", "--workers", "0", "--eval-every", "0"], _env(cluster, LAUNCHER="srun"), steps)
    assert log.count("2 node(s), 2 ranks, launcher srun") == 2, log  # the first run and the requeued one
    records = of_type(read_metrics(tmp_path / "m.jsonl"), "step")
    assert sorted(r["step"] for r in records) == list(range(steps)) and {r["size"] for r in records} == {2}, log


def test_imagenet_template_through_mpirun(slurm, cluster, tmp_path):
    env = _env(cluster, DATA_DIR=write_imagefolder(tmp_path / "imagenet"), ARCH="resnet18", LAUNCHER="mpirun",
               BACKUP_WORKERS="1", CHECKPOINT_DIR=str(tmp_path / "ck"), METRICS=str(tmp_path / "m.jsonl"))
    proc = sbatch(slurm, tmp_path, "imagenet.sh", ["--nodes=2", "--ntasks-per-node=1", *TINY],
                  ["--image-size", "32", "--steps", "3", "-b", "2", "--workers", "0", "--eval-every", "0"], env=env,
                  timeout=JOB_DEADLINE)
    log = _job_log(tmp_path)
    assert proc.returncode == 0, proc.stderr + log
    assert "2 node(s), 2 ranks, launcher mpirun" in log and "done: 3 steps" in log, log
    steps = of_type(read_metrics(tmp_path / "m.jsonl"), "step")
    assert [s["step"] for s in steps] == [0, 1, 2] and steps[0]["size"] == 2
    assert latest_checkpoint(str(tmp_path / "ck")).endswith("checkpoint-00000003.pt")
