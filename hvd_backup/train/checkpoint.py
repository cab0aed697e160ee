"""Checkpoints: written atomically by rank 0 (temporary file, fsync, rename), the last few kept, validated on load.

A crash while writing leaves the previous checkpoints untouched; a file that is truncated, foreign, or from a
different model is refused with a one-line error.
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import UserError

__all__ = ["CheckpointError", "FORMAT", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

FORMAT = "hvd_backup-checkpoint/1"
_NAME = re.compile(r"^checkpoint-(\d{8,})\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used."""


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    if not os.path.isdir(directory):
        return []
    found = sorted((int(m.group(1)), name) for name in os.listdir(directory) if (m := _NAME.match(name)))
    return [os.path.join(directory, name) for _, name in found]


def latest_checkpoint(directory: str) -> str | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, directory: str, step: int, keep: int = 3) -> str:
    """Write ``state`` as ``checkpoint-<step>.pt`` atomically; keep the newest ``keep`` checkpoints."""
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"checkpoint-{step:08d}.pt")
    tmp = f"{final}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(dict(state, format=FORMAT, global_step=step), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        if old != final:
            os.remove(old)
    return final


def load_checkpoint(path: str, *, expect: dict) -> dict:
    """Load and check a checkpoint: its format, and that ``expect``'s keys match what it was saved with."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {path!r}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"--resume {path!r}: unreadable (truncated or not a checkpoint): {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"--resume {path!r}: not a hvd_backup checkpoint (format {FORMAT} expected)")
    saved = state.get("config", {})
    for key, value in expect.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"--resume {path!r}: saved with {key}={saved.get(key)!r}, this run has {key}={value!r}"
            )
    return state
