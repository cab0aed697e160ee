"""What a run reports: one fixed-format line per step (for people and scripts), a JSON-lines metrics file
(written by rank 0, read back by the demo, the planner, the benchmarks and the tests), and the
torchvision-reference meters."""

from __future__ import annotations

import json
import math
import os

__all__ = ["AverageMeter", "MetricsFile", "format_step", "of_type", "parse_step_line", "read_metrics", "summary_of"]

STEP_LINE = ("step {step:>7d} | loss {loss:8.4f} | lr {lr:9.3e} | in {count:>3d}/{size:<3d} | dropped {dropped:<12s} "
             "| step {step_ms:8.1f} ms | wait {wait_ms:8.1f} ms")


def format_step(*, step, loss, lr, count, size, dropped, step_s, wait_s) -> str:
    """The per-step log line; ``parse_step_line`` reads it back."""
    return STEP_LINE.format(step=step, loss=math.nan if loss is None else loss, lr=lr, count=count, size=size,
                            dropped=",".join(map(str, dropped)) or "-", step_ms=step_s * 1e3, wait_ms=wait_s * 1e3)


def parse_step_line(line: str) -> dict | None:
    parts = [p.strip() for p in line.split("|")]
    if len(parts) != 7 or not parts[0].startswith("step "):
        return None
    count, size = parts[3].split()[1].split("/")
    dropped = parts[4].split()[1]
    return {
        "step": int(parts[0].split()[1]), "loss": float(parts[1].split()[1]), "lr": float(parts[2].split()[1]),
        "count": int(count), "size": int(size), "dropped": [] if dropped == "-" else [int(x) for x in dropped.split(",")],
        "step_ms": float(parts[5].split()[1]), "wait_ms": float(parts[6].split()[1]),
    }


class MetricsFile:
    """JSON lines, one record per step or evaluation, flushed as written. Only rank 0 opens one."""

    def __init__(self, path: str | None):
        self._f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str, *, partial: bool = False) -> list[dict]:
    """Every record of a metrics file, in order. ``partial``: the file of a run still writing it (a line cut
    short is skipped; a missing file has no records)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        if partial:
            return []
        raise
    records = []
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not partial:
                raise
    return records


def of_type(records: list[dict], kind: str) -> list[dict]:
    """The records of one ``type``: ``step``, ``eval``, ``verify`` or ``summary``."""
    return [r for r in records if r.get("type") == kind]


def summary_of(records: list[dict]) -> dict:
    """The run's summary record (written at the end of a run), or ``{}``."""
    found = of_type(records, "summary")
    return found[-1] if found else {}


class AverageMeter:
    """Running average (as in pytorch/examples' imagenet/main.py)."""

    def __init__(self, name: str, fmt: str = ":f"):
        self.name, self.fmt = name, fmt
        self.reset()

    def reset(self) -> None:
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / max(1, self.count)

    def __str__(self) -> str:
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)
