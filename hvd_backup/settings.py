"""The rules for the optimizer's settings, in one place: ``hvd_backup.DistributedOptimizer`` and the training
command line both check with them, each spelling the setting its own way (``backup_workers=3`` or
``--backup-workers 3``). Without the number of ranks, only what does not depend on it is checked."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Settings", "check"]

BACKENDS = ("horovod", "mpi")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_seconds(x) -> bool:  # any finite positive number
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class Settings:
    """The checked settings: b to start with, the largest b (``auto`` only) and the fewest workers a timeout
    may close a step with."""

    b: int
    b_max: int | None
    min_workers: int


def check(values: dict, *, size: int | None, spell: Callable[[str, object], str],
          optional: str = "None or ") -> Settings | None:
    """Raise ``ValueError`` naming the first bad setting in ``values`` (keys: the optimizer's keyword names;
    missing keys are not checked); ``spell(name, value)`` writes the setting as the caller's user wrote it, and
    ``optional`` how the rules of settings that may be left unset begin.
    With ``size`` (N), return the resolved :class:`Settings`."""

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{spell(name, values[name])} must be {rule}")

    get = values.get
    b = get("backup_workers", 0)
    auto = b == "auto"
    n = f" < N={size}" if size is not None else ""
    if "backup_workers" in values and not auto:
        need(_is_int(b) and b >= 0 and (size is None or b < size), "backup_workers",
             f"an integer with 0 <= b{n}, or 'auto'")
    b_max = get("max_backup_workers")
    if b_max is not None:
        need(_is_int(b_max) and b_max >= 0 and (size is None or b_max < size), "max_backup_workers",
             f"{optional}an integer with 0 <= it{n}")
    elif auto and size is not None:
        b_max = min(max(1, size // 4), size - 1)  # the default; 0 on one rank
    if "auto_every" in values:
        need(_is_int(get("auto_every")) and get("auto_every") >= 1, "auto_every", "an integer >= 1")
    for name in ("straggler_timeout", "startup_timeout"):
        if get(name) is not None:
            need(_is_seconds(get(name)), name, f"{optional}seconds > 0")
    if "hang_timeout" in values:
        need(_is_seconds(get("hang_timeout")), "hang_timeout", "seconds > 0")
    if get("max_lag") is not None:
        need(_is_int(get("max_lag")) and get("max_lag") >= 1, "max_lag", f"{optional}an integer >= 1")
    if get("detach_after") is not None:
        need(_is_int(get("detach_after")) and get("detach_after") >= 1, "detach_after",
             f"{optional}an integer >= 1")
        if get("backend", "mpi") != "mpi":
            raise ValueError(f"{spell('detach_after', get('detach_after'))} needs backend 'mpi' (Horovod's "
                             f"allreduce cannot leave ranks out), not {get('backend')!r}")
    if "overlap" in values:
        need(isinstance(get("overlap"), bool), "overlap", "True or False")
    if "bucket_cap_mb" in values:
        need(_is_seconds(get("bucket_cap_mb")), "bucket_cap_mb", "a number of MiB > 0")
    if "backend" in values and get("backend") not in BACKENDS:
        raise ValueError(f"{spell('backend', get('backend'))} is not one of {', '.join(map(repr, BACKENDS))}")
    quorum = None if size is None else size - (b_max if auto else b)
    m = get("min_workers")
    if m is not None:
        upper = "" if quorum is None else f" <= N-b={quorum}"
        need(_is_int(m) and 1 <= m and (quorum is None or m <= quorum), "min_workers",
             f"an integer with 1 <= min_workers{upper}")
    if size is None:
        return None
    return Settings(b=0 if auto else int(b), b_max=b_max if auto else None, min_workers=1 if m is None else int(m))
