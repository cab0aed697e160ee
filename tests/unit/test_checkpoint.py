"""Checkpoints on disk: atomic writes, pruning, and refusing files that are not ours or do not fit."""

import io
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


@pytest.mark.parametrize("step", [2, 1], ids=["next-step", "same-step-again"])
def test_a_write_cut_off_halfway_leaves_the_previous_checkpoint(tmp_path, monkeypatch, step):
    """The disk fills up halfway through writing: half of the new checkpoint's bytes reach the file, then an
    error. A direct write would leave a truncated checkpoint-<step>.pt that the next --resume finds; the
    atomic one leaves only a temporary file, which is never listed."""
    save_checkpoint(state(1), str(tmp_path), 1)
    real_save = torch.save

    def half_then_full(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data)
        else:
            f.write(data)
            f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError):
        save_checkpoint(state(step), str(tmp_path), step)
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-00000001.pt")
    assert load_checkpoint(latest_checkpoint(str(tmp_path)), expect=IDENTITY)["global_step"] == 1
    assert torch.equal(load_checkpoint(latest_checkpoint(str(tmp_path)), expect=IDENTITY)["model"]["w"],
                       torch.full((3,), 1.0))


def test_the_file_is_on_disk_before_it_gets_its_name(tmp_path, monkeypatch):
    """Temporary file written and fsynced, then renamed to its final name, then the folder fsynced: after a
    power cut the name never points at data that did not reach the disk."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = save_checkpoint(state(), str(tmp_path), 7)
    renames = [e for e in events if e[0] == "replace"]
    assert len(renames) == 1 and renames[0][2] == final, events
    tmp = renames[0][1]
    assert os.path.dirname(tmp) == str(tmp_path)  # a rename within one file system
    assert events.index(("fsync", tmp)) < events.index(renames[0]) < events.index(("fsync", str(tmp_path))), events


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
