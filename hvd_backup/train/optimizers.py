"""The optimizer for each ``--mode`` (this project's, ``hvd.DistributedOptimizer``, asynchronous SGD), and the
initial parameters every rank starts from."""

from __future__ import annotations

import torch

from ..errors import UserError
from .config import TrainConfig

__all__ = ["broadcast_initial", "make_optimizer", "start_horovod"]


def start_horovod(cfg: TrainConfig, comm):
    """``horovod.torch`` initialised on ``comm`` when the mode needs it, else ``None``. Collective."""
    if not (cfg.mode == "sync" or (cfg.mode == "backup" and cfg.backend == "horovod")):
        return None
    try:
        import horovod.torch as hvd
    except ImportError:
        raise UserError("Horovod is not installed here: run `make setup`, or use --backend mpi") from None
    hvd.init(comm=comm)
    return hvd


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, comm, hvd, *, lr: float):
    """SGD with momentum over ``model``, distributed as ``cfg.mode`` says. Collective."""
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.mode == "backup":
        import hvd_backup

        return hvd_backup.DistributedOptimizer(
            base, model.named_parameters(), backup_workers=cfg.backup_workers, auto_every=cfg.auto_every,
            max_backup_workers=cfg.max_backup_workers, straggler_timeout=cfg.straggler_timeout,
            min_workers=cfg.min_workers, hang_timeout=cfg.hang_timeout, max_lag=cfg.max_lag,
            detach_after=cfg.detach_after, backend=cfg.backend, overlap=cfg.overlap, bucket_cap_mb=cfg.bucket_cap_mb)
    if cfg.mode == "sync":
        from ..baselines.sync import SyncOptimizer

        return SyncOptimizer(hvd, hvd.DistributedOptimizer(base, named_parameters=model.named_parameters()), comm)
    from ..baselines.async_sgd import AsyncOptimizer

    return AsyncOptimizer(base, comm=comm)


def broadcast_initial(model: torch.nn.Module, comm, hvd) -> None:
    """Every rank starts from rank 0's parameters and buffers. Collective."""
    if hvd is None:
        import hvd_backup

        hvd_backup.broadcast_parameters(model.state_dict(), root_rank=0, comm=comm)
        return
    # Horovod broadcasts contiguous tensors only (channels_last weights are not): stage those.
    state = model.state_dict()
    staged = {k: v if v.is_contiguous() else v.contiguous() for k, v in state.items()}
    hvd.broadcast_parameters(staged, root_rank=0)
    for k, v in state.items():
        if staged[k] is not v:
            v.copy_(staged[k])
