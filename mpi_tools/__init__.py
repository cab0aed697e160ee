"""MPI-only building blocks of hvd_backup: the arrival counter, deadlines, a shared clock, pending sends,
straggler injection and the local launcher. Nothing here imports torch.

Names are imported lazily, so that ``mpi_tools.launch`` and ``mpi_tools.straggler`` can be used by a process
that must not initialise MPI itself (e.g. the one that starts ``mpirun``).
"""

import importlib

_WHERE = {
    "ArrivalCounter": "counter",
    "WordState": "counter",
    "WindowError": "counter",
    "ClockSync": "clock",
    "Backoff": "deadline",
    "Deadline": "deadline",
    "Pending": "pending",
    "StragglerInjector": "straggler",
    "parse_spec": "straggler",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
