"""hvd_backup: synchronous data-parallel SGD with backup workers for PyTorch, on Horovod and MPI.

Each step waits only for the first N - b ranks whose gradients are ready (Chen et al., "Revisiting
Distributed Synchronous SGD", 2016), decided by an MPI one-sided counter instead of a parameter server:

    import horovod.torch as hvd
    import hvd_backup

    hvd.init()
    opt = hvd_backup.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                          named_parameters=model.named_parameters(), backup_workers=1)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

The library is the wrapper (:mod:`hvd_backup.optimizer`), the per-step protocol it runs
(:mod:`hvd_backup.protocol`), the tensors it moves (:mod:`hvd_backup.tensors`) and the allreduce underneath
(:mod:`hvd_backup.backends`). Beside it: the training application (:mod:`hvd_backup.train`), the baselines it
compares with (:mod:`hvd_backup.baselines`), the b-planner and simulations (:mod:`hvd_backup.planning`) and the
benchmarks (:mod:`hvd_backup.bench`).
"""

import importlib

from .errors import HangError, ProtocolError, RankFailedError

__version__ = "0.1.0"
__all__ = ["ClosedBy", "Compression", "DistributedOptimizer", "HangError", "ProtocolError", "RankFailedError",
           "Status", "StepRecord", "broadcast_parameters"]

# Imported on first use, so that the command line can reject bad flags before paying for importing torch.
_LAZY = {"DistributedOptimizer": "optimizer", "StepRecord": "records", "Status": "records", "ClosedBy": "records",
         "Compression": "horovod_compat"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def broadcast_parameters(params, root_rank: int = 0, *, comm=None) -> None:
    """Copy ``params`` (a ``state_dict()`` or ``named_parameters()``) from ``root_rank`` to every rank with
    mpi4py: the ``backend="mpi"`` counterpart of ``hvd.broadcast_parameters``. Collective."""
    import torch
    from mpi4py import MPI

    comm = comm if comm is not None else MPI.COMM_WORLD
    items = sorted(params.items()) if isinstance(params, dict) else list(params)
    for _, tensor in items:
        if not torch.is_tensor(tensor) or tensor.numel() == 0:
            continue
        host = tensor.detach().cpu().contiguous()
        comm.Bcast(host.reshape(-1).view(torch.uint8).numpy(), root=root_rank)
        with torch.no_grad():
            tensor.copy_(host)
