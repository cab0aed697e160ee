"""Command-line checks, the step-line format, shards, and models: bad input gets one line naming the value."""

import pytest
import torch

from hvd_backup.train.config import ConfigError, parse_args
from hvd_backup.train.data import DataError, ShardBatches, load_dataset
from hvd_backup.train.metrics import format_step, parse_step_line
from hvd_backup.train.models import ModelError, build_model


def test_defaults_train_digits():
    cfg = parse_args([])
    assert (cfg.dataset, cfg.mode, cfg.backup_workers, cfg.workers) == ("digits", "backup", 1, 0)


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    (["--backup-workers", "two"], "argument --backup-workers: invalid value 'two': an integer or 'auto'"),
    (["--backup-workers", "-1"], "--backup-workers -1: must be an integer with 0 <= b, or 'auto'"),
    (["--straggler-timeout", "0"], "--straggler-timeout 0.0: must be seconds > 0"),
    (["--hang-timeout", "-5"], "--hang-timeout -5.0: must be seconds > 0"),
    (["-b", "0"], "--batch-size 0: must be >= 1"),
    (["--lr", "nan"], "--lr nan: must be > 0"),
    (["--min-workers", "0"], "--min-workers 0: must be an integer with 1 <= min_workers"),
    (["--resume"], "--resume without a path needs --checkpoint-dir"),
    (["--channels-last", "--mode", "sync"], "--channels-last: not with --mode sync on --backend horovod"),
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["--mode", "async", "--verify-every", "10"], "--verify-every: not with --mode async"),
])
def test_bad_flags(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        parse_args(argv)
    assert "\n" not in str(info.value)


def test_step_line_round_trips():
    line = format_step(step=12, loss=0.5, lr=0.0125, count=3, size=4, dropped=(3,), step_s=0.0123, wait_s=0.002)
    assert parse_step_line(line) == {"step": 12, "loss": 0.5, "lr": 0.0125, "count": 3, "size": 4, "dropped": [3],
                                     "step_ms": 12.3, "wait_ms": 2.0}


def test_shards_cover_the_epoch_once_and_reshuffle():
    size, batch = 3, 4
    shards = [list(ShardBatches(50, rank=r, size=size, batch_size=batch, seed=1, epoch=0)) for r in range(size)]
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == len(set(seen)) == size * (17 // batch) * batch
    again = list(ShardBatches(50, rank=0, size=size, batch_size=batch, seed=1, epoch=1))
    assert again != shards[0]
    resumed = list(ShardBatches(50, rank=0, size=size, batch_size=batch, seed=1, epoch=0, start=2))
    assert resumed == shards[0][2:]


def test_a_data_set_smaller_than_one_batch_is_an_error():
    message = "the training set has 10 samples, 3 per rank on 4 ranks: fewer than one batch of --batch-size 8"
    with pytest.raises(DataError, match=message):
        ShardBatches(10, rank=0, size=4, batch_size=8, seed=0, epoch=0)


def test_missing_data_folders(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_dataset("imagenet", data=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="missing train/"):
        load_dataset("imagenet", data=str(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="train/"):
        load_dataset("imagenet", data=str(tmp_path))
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data=str(tmp_path))


def test_digits_split_is_fixed():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])


def test_models():
    assert build_model("digits_cnn", num_classes=10, channels=1)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert build_model("cifar_resnet18", num_classes=10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("resnet18", num_classes=7)(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ModelError, match="--arch 'resnet9000' is not a model here"):
        build_model("resnet9000", num_classes=10)
