"""The three algorithms on a :class:`~.job.VirtualJob`, with the real ones' semantics; only the gradients that
count are computed.

* ``sync`` and ``backup`` (:func:`train_steps`): the protocol's clock
  (:class:`~hvd_backup.planning.simulate.Schedule`) closes a step at the first N - b arrivals of gradients
  computed on its parameters; the update is the wrapped SGD's step on the mean of the included gradients (the
  reweighting: divided by their count, not by N); a worker whose gradient comes after its step closed loses it
  and restarts on the newest parameters. ``sync`` is b = 0 (``hvd.DistributedOptimizer``'s mean over all N);
  ``auto`` re-chooses b with the engine's own :class:`~hvd_backup.protocol.adaptive.AutoBackup`. With the
  gradient in buckets (``job.overlap``) the clock is :class:`~hvd_backup.planning.simulate.BucketSchedule`, and
  where the ranks in for the buckets differ (``Inclusion.BUCKET``) each bucket's part of the update is the mean
  over its own ranks.
* ``async`` (:func:`train_async`): each update is applied when it lands, computed on the parameters the worker
  read; its staleness is the number of updates that landed between that read and this write; each worker keeps
  its own momentum on its own gradients, weight decay on the parameters it read (as ``--mode async``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...protocol.adaptive import AutoBackup
from ...records import ClosedBy, Status, StepRecord
from ...tensors import flat_views
from ...train.trainer import step_seed
from ..simulate import Schedule
from .async_clock import AsyncSchedule
from .workers import fetch

__all__ = ["train_async", "train_steps"]


def _batch_independent(model: nn.Module) -> bool:
    """True if a forward pass over several workers' batches at once gives each sample what it would get alone:
    no batch statistics and no random layers, so the mean gradient over the included workers is one backward
    pass over their batches together."""
    return not any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd))
                   for m in model.modules())


def train_steps(job) -> dict:
    """Sync and backup workers: the protocol's clock closes each step; the included gradients are computed."""
    cfg, n, trainer, model = job.cfg, job.n, job.trainer, job.model
    opt = torch.optim.SGD(model.parameters(), lr=trainer.peak_lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)  # the trainer's base optimizer in every mode
    b = job.settings.b
    auto = None
    if job.settings.b_max is not None:
        auto = AutoBackup(n, every=cfg.auto_every, b_min=0, b_max=job.settings.b_max)
    taken: dict[tuple[int, int], list[int]] = {}  # (rank, version) -> the batch that gradient is computed on

    def take(rank: int, version: int) -> None:
        taken[(rank, version)] = job.streams[rank].next(version)  # the loop takes its batch as it starts

    def start(rank: int, version: int) -> float:
        take(rank, version)
        return job.work(rank, version)

    comm_s = job.network.step_s(n, job.nbytes, counter=cfg.mode == "backup")
    if job.overlap is None:
        clock = Schedule(n, start, comm_s)
    else:
        clock = job.clock(take)
    together = _batch_independent(model)
    dropped, chosen, last, last_duration, mixed = [0] * n, [[0, b]], 0.0, 0.0, 0
    for t in range(trainer.total):
        k = n if t == 0 else n - b  # step 0 waits for every rank (the protocol's start-up)
        if job.overlap is None:
            included, seconds = clock.close(k)
            sets = [included]
        else:
            sets, seconds = clock.close(k)
            included = list(dict.fromkeys(r for members in sets for r in members))
            job.sets.append([sorted(members) for members in sets])
        per_bucket = any(set(members) != set(sets[0]) for members in sets)
        mixed += per_bucket
        batches = [fetch(job.train, taken.pop((rank, t)), job.device) for rank in included]
        for key in [key for key in taken if key[1] <= t]:  # gradients still being computed on t: never used
            del taken[key]
        inside = set(included)
        for rank in range(n):
            dropped[rank] += rank not in inside
        job.included.append(sorted(included))
        for group in opt.param_groups:
            group["lr"] = trainer.lr_at(t)
        opt.zero_grad()
        losses = {}
        if per_bucket:
            _mean_per_bucket(job, t, included, batches, sets, losses)
        elif together:
            out = model(torch.cat([x for x, _ in batches]))
            at = 0
            for rank, (_, y) in zip(included, batches):
                losses[rank] = trainer.criterion(out[at:at + len(y)], y)
                at += len(y)
            (sum(losses.values()) / len(batches)).backward()  # the mean of the included gradients
        else:
            for rank, (x, y) in zip(included, batches):
                torch.manual_seed(step_seed(cfg.seed, rank, t))
                losses[rank] = trainer.criterion(model(x), y)
                (losses[rank] / len(batches)).backward()  # gradients add up to the mean of the included
        job.losses.append({rank: loss.item() for rank, loss in losses.items()})
        opt.step()
        duration = clock.time - last
        if auto is not None:
            record = StepRecord(step=t, size=n, count=k, included=tuple(sorted(included)),
                                closed_by=ClosedBy.ALL if k == n else ClosedBy.QUORUM, status=Status.INCLUDED,
                                wait_s=0.0, arrival_s=(), compute_s=tuple(seconds.get(rank) for rank in range(n)),
                                duration_s=duration, rank_step_s=(last_duration,) * n, quorum=k)
            new = auto.observe(record)
            if new is not None and new != b:  # in force from the next step, as in the engine
                b = new
                chosen.append([t + 1, b])
        last, last_duration = clock.time, duration
        s = t + 1
        if cfg.eval_every and s % cfg.eval_every == 0 and s < trainer.total:
            job.evaluate(s, clock.time)
    job.evaluate(trainer.total, clock.time)
    return job.summary(comm_s=comm_s, mean_step_s=clock.time / trainer.total, dropped_per_rank=dropped,
                       gradients=n * trainer.total - sum(dropped), b_chosen=chosen, per_bucket_steps=mixed)


def _mean_per_bucket(job, t: int, included: list[int], batches: list, sets: list[list[int]], losses: dict) -> None:
    """Leave in each parameter's ``.grad`` the mean of the gradients of the ranks in for its bucket; each of
    ``included`` (the ranks in for any bucket, with their ``batches``) computes its own, into ``losses``."""
    cfg, trainer, params = job.cfg, job.trainer, job.params
    grads = {}
    for rank, (x, y) in zip(included, batches):
        for p in params:
            p.grad = None
        torch.manual_seed(step_seed(cfg.seed, rank, t))
        losses[rank] = trainer.criterion(job.model(x), y)
        losses[rank].backward()
        grads[rank] = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for group, members in zip(job.groups, sets):
        for i in group:
            params[i].grad = torch.stack([grads[rank][i] for rank in members]).sum(0) / len(members)


def train_async(job) -> dict:
    """Async on :class:`~.async_clock.AsyncSchedule`: a worker's gradient is computed when it reads, applied when
    it lands."""
    cfg, n, trainer, model, params = job.cfg, job.n, job.trainer, job.model, job.params
    # The shared parameters, one flat buffer (the window on the root); the model's parameters are views of it.
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    for p, view in zip(params, flat_views(params, flat)):
        p.data = view
    mu, wd, total = cfg.momentum, cfg.weight_decay, trainer.total
    momentum: list[torch.Tensor | None] = [None] * n
    pending: dict[int, tuple[torch.Tensor, float]] = {}  # rank -> (its update's gradient, learning rate)
    staleness: list[int] = []
    updates = [0] * n

    def read(rank: int, version: int) -> None:
        x, y = fetch(job.train, job.streams[rank].next(version), job.device)
        torch.manual_seed(step_seed(cfg.seed, rank, version))
        model.zero_grad(set_to_none=True)
        loss = trainer.criterion(model(x), y)
        loss.backward()
        job.losses.append({rank: loss.item()})
        with torch.no_grad():
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            if wd:
                grad.add_(flat, alpha=wd)  # on the parameters it read, as --mode async does
        pending[rank] = (grad, trainer.lr_at(version))

    def land(rank: int, version: int, written: int, at: float) -> None:
        grad, lr = pending.pop(rank)
        staleness.append(written - version)
        updates[rank] += 1
        with torch.no_grad():
            if momentum[rank] is None:
                momentum[rank] = torch.zeros_like(flat)
            momentum[rank].mul_(mu).add_(grad)
            flat.add_(momentum[rank], alpha=-lr)
        s = written + 1
        if cfg.eval_every and s % cfg.eval_every == 0 and s < total:
            job.evaluate(s, at)

    move, fixed = job.network.transfer_s(job.nbytes), job.network.update_s()
    end = AsyncSchedule(n, job.work, move_s=move, update_s=fixed).run(total, read, land)
    job.evaluate(len(staleness), end)
    s = np.array(staleness)
    return job.summary(update_s=fixed + 2 * move, mean_update_interval_s=end / max(1, len(s)), updates=len(s),
                       updates_per_rank=updates, gradients=len(s), mean_staleness=float(s.mean()),
                       median_staleness=float(np.median(s)), p99_staleness=float(np.percentile(s, 99)),
                       max_staleness=int(s.max()))
