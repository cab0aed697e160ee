"""Checkpoints on disk: atomic writes, pruning, and refusing files that are not ours or do not fit."""

import os

import pytest
import torch

from hvd_backup.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

IDENTITY = {"arch": "digits_cnn", "dataset": "digits", "num_classes": 10}


def state(value=1.0):
    return {"model": {"w": torch.full((3,), value)}, "config": dict(IDENTITY)}


def test_save_load_roundtrip_and_keep_newest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(state(step), str(tmp_path), step, keep=2)
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint-00000030.pt", "checkpoint-00000040.pt"]
    loaded = load_checkpoint(latest_checkpoint(str(tmp_path)), expect=IDENTITY)
    assert loaded["global_step"] == 40 and torch.equal(loaded["model"]["w"], torch.full((3,), 40.0))
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_an_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(state(1), str(tmp_path), 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(state(2), str(tmp_path), 2)
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-00000001.pt")
    assert load_checkpoint(latest_checkpoint(str(tmp_path)), expect=IDENTITY)["global_step"] == 1


def test_truncated_file_is_refused_with_one_line(tmp_path):
    path = save_checkpoint(state(), str(tmp_path), 5)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="unreadable .truncated or not a checkpoint") as info:
        load_checkpoint(path, expect=IDENTITY)
    assert "\n" not in str(info.value)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a hvd_backup checkpoint"):
        load_checkpoint(str(path), expect=IDENTITY)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(str(junk), expect=IDENTITY)


def test_mismatched_model_is_refused(tmp_path):
    path = save_checkpoint(state(), str(tmp_path), 5)
    with pytest.raises(CheckpointError, match="saved with arch='digits_cnn', this run has arch='resnet18'"):
        load_checkpoint(path, expect=dict(IDENTITY, arch="resnet18"))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(str(tmp_path / "nope.pt"), expect=IDENTITY)
