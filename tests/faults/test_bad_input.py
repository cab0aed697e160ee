"""Bad input to the trainer, each case a test: one clear line, printed by rank 0, exit code 2 (the job's, which
mpirun takes from its ranks), no traceback, no hang. The jobs are independent, so they run a few at a time
(this machine has 2 cores)."""

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.e2e.helpers import TRAIN, launch, own_session

NP = 2
WORKERS, JOB_TIMEOUT = 3, 60


def _checkpoints(root):
    from hvd_backup.train.checkpoint import save_checkpoint

    identity = {"arch": "digits_cnn", "dataset": "digits", "num_classes": 10}
    good = save_checkpoint({"model": {}, "optimizer": {}, "config": identity}, os.path.join(root, "good"), 4)
    truncated = os.path.join(root, "truncated.pt")
    with open(good, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[:200])
    foreign = os.path.join(root, "foreign.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    other = save_checkpoint({"model": {}, "optimizer": {}, "config": dict(identity, arch="resnet18")},
                            os.path.join(root, "other"), 4)
    return {"truncated": truncated, "foreign": foreign, "other": other}


# name: (flags, expected message); {root} is the test's scratch folder.
CASES = {
    "unknown-dataset": (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    "unknown-model": (["--arch", "resnet9000"], "--arch 'resnet9000' is not a model here"),
    "unknown-backend": (["--backend", "nccl"], "argument --backend: invalid choice: 'nccl'"),
    "missing-data-folder": (["--dataset", "imagenet", "--data", "{root}/nope"], "no such directory"),
    "empty-data-folder": (["--dataset", "imagenet", "--data", "{root}/empty"], "train/: Couldn't find any class folder"),
    "b-negative": (["--backup-workers", "-1"], "--backup-workers -1: must be an integer with 0 <= b, or 'auto'"),
    "b-not-a-number": (["--backup-workers", "two"], "argument --backup-workers: invalid value 'two': an integer or 'auto'"),
    "b-at-least-N": (["--backup-workers", str(NP)],
                     f"--backup-workers {NP}: must be an integer with 0 <= b < N={NP}, or 'auto'"),
    "timeout-zero": (["--straggler-timeout", "0"], "--straggler-timeout 0.0: must be seconds > 0"),
    "timeout-not-a-number": (["--straggler-timeout", "soon"],
                             "argument --straggler-timeout: invalid float value: 'soon'"),
    "hang-timeout-negative": (["--hang-timeout", "-1"], "--hang-timeout -1.0: must be seconds > 0"),
    "detach-needs-mpi": (["--detach-after", "2"],
                         "--detach-after 2: needs backend 'mpi' (Horovod's allreduce cannot leave ranks out), not 'horovod'"),
    "min-workers-above-quorum": (["--backup-workers", "1", "--min-workers", "2"], "--min-workers 2: must be an integer with 1 <= min_workers <= N-b=1"),
    "bad-straggler-spec": (["--straggler", "warp:x=1"], "--straggler: straggler spec 'warp:x=1': unknown kind 'warp'"),
    "straggler-rank-out-of-range": (["--straggler", "fixed:delay=1,rank=7"], "names rank 7, but there are only 2 ranks"),
    "smaller-than-one-batch": (["--dataset", "synthetic", "--synthetic-size", "10", "-b", "8", "--arch", "resnet18"],
                               "fewer than one batch of --batch-size 8"),
    "truncated-checkpoint": (["--resume", "{root}/truncated.pt"], "unreadable (truncated or not a checkpoint)"),
    "foreign-checkpoint": (["--resume", "{root}/foreign.pt"], "not a hvd_backup checkpoint"),
    "mismatched-checkpoint": (["--resume", "{root}/other/checkpoint-00000004.pt"],
                              "saved with arch='resnet18', this run has arch='digits_cnn'"),
    "missing-checkpoint": (["--resume", "{root}/nope.pt"], "no such checkpoint file"),
    # MPMD: rank 0 and rank 1 get different flags.
    "different-flags-per-rank": (["--backup-workers", "1", ":", "-np", "1", *TRAIN, "--backup-workers", "0"],
                                 "--backup-workers differs across ranks: rank 0 has 1, rank 1 has 0"),
}


def _write_inputs(root):
    from hvd_backup.train.checkpoint import save_checkpoint

    identity = {"arch": "digits_cnn", "dataset": "digits", "num_classes": 10}
    good = save_checkpoint({"model": {}, "optimizer": {}, "config": identity}, os.path.join(root, "good"), 4)
    with open(good, "rb") as src, open(os.path.join(root, "truncated.pt"), "wb") as dst:
        dst.write(src.read()[:200])
    torch.save({"state_dict": {"w": torch.zeros(2)}}, os.path.join(root, "foreign.pt"))
    save_checkpoint({"model": {}, "optimizer": {}, "config": dict(identity, arch="resnet18")},
                    os.path.join(root, "other"), 4)
    os.makedirs(os.path.join(root, "empty", "train"))
    os.makedirs(os.path.join(root, "empty", "val"))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad-input"))
    _write_inputs(root)

    def one(name):
        args = [a.format(root=root) for a in CASES[name][0]]
        np_ = 1 if name == "different-flags-per-rank" else NP
        with own_session() as session:  # the jobs start at the same moment
            return name, launch(np_, args, timeout=JOB_TIMEOUT, tag_output=True, env=session)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.deadline(-(-len(CASES) // WORKERS) * JOB_TIMEOUT + 30)  # the first test runs every job
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(outcomes, name):
    message = CASES[name][1]
    proc = outcomes[name]
    out = proc.stdout
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{out}"
    # --tag-output: every line starts with [job,rank]<stream>:
    lines = re.findall(r"^\[\d+,(\d+)\]<std(?:out|err)>:(.*hvd-backup-train: error: .*)$", out, re.M)
    assert [rank for rank, _ in lines] == ["0"], f"expected one error line, from rank 0:\n{out}"
    assert message in lines[0][1], lines[0][1]
    assert "Traceback" not in out, out
