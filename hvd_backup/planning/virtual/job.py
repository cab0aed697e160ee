"""One training job on N virtual workers: the trainer's model, data, learning-rate rule and schedule sized for
N ranks, evaluations on the virtual clock, and the run's summary."""

from __future__ import annotations

import contextlib
import dataclasses
import time

from ... import settings
from ...buckets import bucket_groups
from ...train.config import TrainConfig
from ...train.data import Split
from ...train.evaluation import Evaluator
from ..simulate import BucketSchedule, Inclusion
from .network import Network
from .work import BucketTimes, WorkTimes
from .workers import Ranks, WorkerBatches, in_memory

__all__ = ["Overlap", "VirtualJob", "run"]


@dataclasses.dataclass(frozen=True)
class Overlap:
    """The gradient in buckets as ``overlap=True`` lays it out (``bucket_cap_mb``, a first bucket of
    ``first_bucket_mb``), who is in for which bucket (:class:`~hvd_backup.planning.simulate.Inclusion`), and the
    timeline of a worker's step (:class:`~.work.BucketTimes`)."""

    inclusion: Inclusion
    bucket_cap_mb: float = 25.0
    first_bucket_mb: float = 1.0
    backward_fraction: float = 0.67
    delay_at: str = "start"


class VirtualJob:
    """``cfg`` (its ``mode`` and ``backup_workers``) on ``n`` virtual workers, sized as the trainer sizes it for
    ``n`` ranks. :meth:`run` trains it; then ``model`` holds the final parameters, ``losses`` every step's
    training loss of each included worker (async: of every update's worker), ``included`` every step's included
    workers (sync and backup; with overlap, those in for any bucket), ``sets`` (with overlap) those in for each
    bucket."""

    def __init__(self, cfg: TrainConfig, n: int, work: WorkTimes, network: Network, *,
                 target: float | None = None, overlap: Overlap | None = None):
        from mpi4py import MPI

        from ...train.trainer import Trainer

        cfg.check_world(n)
        self.cfg, self.n, self.work, self.network, self.target = cfg, n, work, network, target
        self.overlap = overlap
        values = {"backup_workers": cfg.backup_workers if cfg.mode == "backup" else 0,
                  "max_backup_workers": cfg.max_backup_workers}
        self.settings = settings.check(values, size=n, spell=lambda k, v: f"--{k.replace('_', '-')} {v}:")
        self.trainer = Trainer(cfg, Ranks(n))
        split = self.trainer.split
        self.train = in_memory(split.train)
        self.trainer.split = Split(self.train, in_memory(split.test), split.num_classes, split.channels,
                                   split.image_size)
        self.model, self.device = self.trainer.model, self.trainer.device
        # One process evaluates on the whole test set.
        self.evaluator = Evaluator(self.model, self.trainer.split.test, MPI.COMM_SELF,
                                   batch_size=max(64, cfg.batch_size), workers=0,
                                   num_classes=split.num_classes, autocast=contextlib.nullcontext)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.nbytes = network.model_bytes or sum(p.numel() * p.element_size() for p in self.params)
        # Parameter indices per bucket (one bucket without overlap), in backward order, as the optimizer cuts them.
        self.groups = [range(len(self.params))]
        if overlap is not None:
            self.groups = bucket_groups([p.numel() for p in self.params], 4, overlap.bucket_cap_mb,
                                        overlap.first_bucket_mb)
        self.streams = [WorkerBatches(self.trainer, rank) for rank in range(n)]
        self.evals: list[dict] = []
        self.losses: list[dict[int, float]] = []
        self.included: list[list[int]] = []
        self.sets: list[list[list[int]]] = []  # with overlap: every step's ranks in for each bucket

    def run(self) -> dict:
        """Train; return the evaluations (step, simulated seconds, top-1), the final top-1, the simulated time,
        the time to ``target``, and per mode the dropped gradients per rank (sync, backup), the choices of b
        (auto) or the staleness (async)."""
        from .algorithms import train_async, train_steps

        tic = time.monotonic()
        result = train_async(self) if self.cfg.mode == "async" else train_steps(self)
        result["wall_s"] = time.monotonic() - tic
        return result

    def clock(self, start) -> BucketSchedule:
        """The protocol's clock for :func:`~.algorithms.train_steps` with overlap: ``start(rank, version)`` is
        called as each gradient starts. Backup workers touch one counter word per step, or one per bucket with
        ``Inclusion.BUCKET``; sync none."""
        counters = 0 if self.cfg.mode != "backup" else \
            len(self.groups) if self.overlap.inclusion is Inclusion.BUCKET else 1
        sizes = [float(sum(self.params[i].numel() for i in group)) for group in self.groups]
        scale = self.nbytes / sum(sizes)  # bytes on the wire per element
        times = BucketTimes(self.work, sizes, backward_fraction=self.overlap.backward_fraction,
                            delay_at=self.overlap.delay_at, seed=self.cfg.seed)

        def ready(rank: int, version: int) -> list[float]:
            start(rank, version)
            return times(rank, version)

        comm = [self.network.bucket_s(self.n, size * scale) for size in sizes]
        return BucketSchedule(self.n, ready, comm, self.overlap.inclusion,
                              close_s=self.network.close_s(self.n, counters=counters))

    def evaluate(self, step: int, at: float) -> None:
        """Evaluate the current parameters after ``step`` steps, at simulated second ``at``."""
        result = self.evaluator()
        self.evals.append({"step": step, "time": at, "top1": result["top1"], "loss": result["loss"]})

    def summary(self, **extra) -> dict:
        cfg, final = self.cfg, self.evals[-1]
        reached = next((e["time"] for e in self.evals if self.target is not None and e["top1"] >= self.target), None)
        return dict(
            ranks=self.n, mode=cfg.mode, backup_workers=cfg.backup_workers if cfg.mode == "backup" else 0,
            seed=cfg.seed, straggler=cfg.straggler or "none", dataset=cfg.dataset, arch=self.trainer.arch,
            batch_size=cfg.batch_size, peak_lr=self.trainer.peak_lr, steps=self.trainer.total,
            final_top1=final["top1"], time_s=final["time"], target=self.target, time_to_target_s=reached,
            evals=self.evals, **({} if self.overlap is None else {"overlap": dict(
                dataclasses.asdict(self.overlap), inclusion=self.overlap.inclusion.value, buckets=len(self.groups))}),
            **extra)


def run(cfg: TrainConfig, n: int, work: WorkTimes, network: Network, *, target: float | None = None,
        overlap: Overlap | None = None) -> dict:
    """Train ``cfg`` on ``n`` virtual workers (:class:`VirtualJob`); return its summary."""
    return VirtualJob(cfg, n, work, network, target=target, overlap=overlap).run()
