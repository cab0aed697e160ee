"""The training job behind ``hvd-backup-train``: set-up, the global-step loop, evaluation, checkpoints."""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import numpy as np
import torch

from ..errors import agree
from ..records import StepRecord
from . import checkpoint as ckpt
from .config import TrainConfig
from .console import EXIT_OK, EXIT_PREEMPTED, print0
from .data import ShardBatches, load_dataset, shard_loader
from .evaluation import Evaluator, eval_line, verify
from .metrics import MetricsFile, format_step
from .models import build_model, default_arch, model_names
from .optimizers import broadcast_initial, make_optimizer, start_horovod

__all__ = ["Trainer", "step_seed"]


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of ``rank``'s forward and backward at global ``step`` (dropout etc.): a function of the
    step, so that a re-run, or a virtual worker, draws the same."""
    return hash((seed, rank, step)) & 0x7FFF_FFFF


def _local_rank() -> int:
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


class Trainer:
    """Built in two phases so every rank agrees on bad input before any collective: the constructor does only
    local work (data, model, schedule); :meth:`setup` makes the optimizer and restores a checkpoint."""

    def __init__(self, cfg: TrainConfig, comm):
        self.cfg, self.comm = cfg, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        if cfg.arch == "list":
            self.arch = "list"
            return
        self.device = torch.device(f"cuda:{_local_rank() % torch.cuda.device_count()}") \
            if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.b = cfg.backup_workers if cfg.mode == "backup" else 0
        if self.b == "auto":
            self.b = 0  # where "auto" starts; the learning rate is scaled for N ranks
        from mpi_tools import StragglerInjector

        self.injector = StragglerInjector(cfg.straggler, rank=self.rank, size=self.size, seed=cfg.seed)
        self.split = load_dataset(cfg.dataset, data=cfg.data, download=cfg.download and self.rank == 0,
                                  image_size=cfg.image_size, num_classes=cfg.num_classes,
                                  synthetic_size=cfg.synthetic_size, seed=cfg.seed)
        self.arch = cfg.arch or default_arch(cfg.dataset)
        torch.manual_seed(cfg.seed)  # the same initial model on every rank (and broadcast from rank 0 anyway)
        self.model = build_model(self.arch, num_classes=self.split.num_classes, channels=self.split.channels)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.steps_per_epoch = self._sampler(0, 0).batches
        if cfg.mode == "async":  # a global step is one rank's update: N of them per synchronous step
            self.steps_per_epoch *= self.size
        self.total = cfg.steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.effective_batch = cfg.batch_size if cfg.mode == "async" else (self.size - self.b) * cfg.batch_size
        self.peak_lr = cfg.lr * self.effective_batch / cfg.lr_base_batch
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.resume_path = None
        if cfg.resume:
            self.resume_path = ckpt.latest_checkpoint(cfg.checkpoint_dir) if cfg.resume == "latest" else cfg.resume
            if self.resume_path is not None:
                self.resume_state = ckpt.load_checkpoint(self.resume_path, expect=self._identity())
        self.evaluate = Evaluator(self.model, self.split.test, comm, batch_size=max(64, cfg.batch_size),
                                  workers=cfg.workers, num_classes=self.split.num_classes, autocast=self._autocast)
        # Evaluations and consistency checks look at the parameters of an exact global step on every rank.
        periods = [p for p in (cfg.eval_every, cfg.verify_every) if p]
        self.snapshot_every = math.gcd(*periods) if periods else 0

    # --- set-up ----------------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"arch": self.arch, "dataset": self.cfg.dataset, "num_classes": self.split.num_classes}

    def _sampler(self, epoch: int, start: int, rank: int | None = None) -> ShardBatches:
        return ShardBatches(len(self.split.train), rank=self.rank if rank is None else rank, size=self.size,
                            batch_size=self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch, start=start)

    def shard(self, epoch: int, start_step: int, rank: int | None = None) -> ShardBatches:
        """``rank``'s (default: this rank's) batches of ``epoch`` from the epoch's global step ``start_step`` on
        (with --mode async a global step is one rank's update: N of them per batch of each rank)."""
        start = start_step // self.size if self.cfg.mode == "async" else start_step
        return self._sampler(epoch, start, rank)

    def _batches(self, epoch: int, start_step: int):
        return iter(shard_loader(self.split.train, self.shard(epoch, start_step), workers=self.cfg.workers,
                                 pin_memory=self.device.type == "cuda"))

    def setup(self) -> None:
        """Collective: Horovod, the distributed optimizer, resume, broadcast of the initial parameters."""
        hvd = start_horovod(self.cfg, self.comm)
        self.opt = make_optimizer(self.cfg, self.model, self.comm, hvd, lr=self.peak_lr)
        if self.cfg.mode == "backup" and self.snapshot_every:
            self.opt.keep_snapshots(self.snapshot_every)
        if self.resume_path is not None:
            self.model.load_state_dict(self.resume_state["model"])
            self.opt.load_state_dict(self.resume_state["optimizer"])
            print0(self.rank, f"resumed from {self.resume_path} at global step {self.opt.global_step}")
        elif self.cfg.resume:
            print0(self.rank, f"no checkpoint in {self.cfg.checkpoint_dir}: starting from scratch")
        broadcast_initial(self.model, self.comm, hvd)

    # --- schedule ----------------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return self.peak_lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(1, self.total - cfg.warmup_steps)
            return 0.5 * self.peak_lr * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
        epoch = step / self.steps_per_epoch
        return self.peak_lr * cfg.lr_gamma ** sum(epoch >= e for e in cfg.step_epochs)

    # --- evaluation --------------------------------------------------------------------------------------------

    def verify(self, step: int, params=None) -> dict:
        return verify(self.comm, step, params if params is not None else self.model.parameters())

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save(self, step: int) -> None:
        if self.rank != 0 or not self.cfg.checkpoint_dir:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "config": dict(self._identity(), mode=self.cfg.mode), "world_size": self.size,
                 "epoch": step // self.steps_per_epoch}
        path = ckpt.save_checkpoint(state, self.cfg.checkpoint_dir, step, keep=self.cfg.keep_checkpoints)
        print(f"checkpoint {path}", flush=True)

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        cfg, rank = self.cfg, self.rank
        if self.arch == "list":
            print0(rank, "\n".join(model_names()))
            return EXIT_OK
        agree(self.comm, self.setup)
        metrics = MetricsFile(cfg.metrics if rank == 0 else None)
        try:
            if cfg.evaluate:
                result = self.evaluate()
                print0(rank, eval_line(self.opt.global_step, result))
                metrics.write(dict(type="eval", step=self.opt.global_step, **result))
                return EXIT_OK
            return self._train(metrics)
        finally:
            metrics.close()
            self.opt.close()

    def _train(self, metrics: MetricsFile) -> int:
        cfg, rank, opt, model = self.cfg, self.rank, self.opt, self.model
        signal.signal(signal.SIGUSR1, lambda *_: opt.request_stop())
        # Open MPI gives ranks a pseudo-terminal even when mpirun's output goes to a file: "auto" means lines there.
        under_ompi = "OMPI_COMM_WORLD_SIZE" in os.environ
        use_bar = rank == 0 and (cfg.progress == "bar" or (cfg.progress == "auto" and sys.stdout.isatty()
                                                           and not under_ompi))
        bar = None
        if use_bar:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=opt.global_step, unit="step", dynamic_ncols=True)
        spe = self.steps_per_epoch
        g = opt.global_step
        epoch, batches = None, None
        dropped_counts = [0] * self.size
        last_compute = 0.0  # seconds of the previous forward and backward (for --straggler slow:factor=F)
        step_times: list[float] = []
        start = time.monotonic()
        print0(rank, f"training {self.arch} on {cfg.dataset}: {self.size} ranks, mode {cfg.mode}, b={self.b}, "
                      f"{self.total} steps ({spe} per epoch), effective batch {self.effective_batch}, "
                      f"peak lr {self.peak_lr:.4g}")
        model.train()
        while g < self.total and not opt.stop_requested:
            v = g
            if v // spe != epoch:
                epoch = v // spe
                batches = self._batches(epoch, v % spe)
            try:
                x, y = next(batches)
            except StopIteration:  # async: a fast rank went through its shard before the epoch ended
                batches = self._batches(epoch, 0)
                x, y = next(batches)
            for group in opt.param_groups:
                group["lr"] = self.lr_at(v)
            torch.manual_seed(step_seed(cfg.seed, rank, v))
            # An injected straggler is slow to produce its gradient (like slow data or compute): the delay comes
            # before the forward pass, so no allreduce (Horovod starts them during backward) hides it.
            self.injector.sleep(v, last_compute)
            tic = time.monotonic()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad()
            with self._autocast():
                loss = self.criterion(model(x), y)
            loss.backward()
            last_compute = time.monotonic() - tic
            opt.step(loss=loss.detach())
            g = opt.global_step
            for rec in opt.pop_records():
                for r in rec.dropped if cfg.mode != "async" else ():
                    dropped_counts[r] += 1
                step_times.append(rec.duration_s)
                self._log_step(rec, metrics, bar, start)
            for s in range(v + 1, g + 1):  # every boundary this rank crossed, in order, like all ranks do
                params = opt.parameters_at(s) if self.snapshot_every and s % self.snapshot_every == 0 else None
                if cfg.eval_every and s % cfg.eval_every == 0 and s < self.total:
                    result = self.evaluate(params)
                    print0(rank, eval_line(s, result))
                    metrics.write(dict(type="eval", step=s, time=time.monotonic() - start, **result))
                if cfg.verify_every and s % cfg.verify_every == 0 and s < self.total:
                    metrics.write(dict(type="verify", step=s, **self.verify(s, params)))
                if cfg.checkpoint_every and s % cfg.checkpoint_every == 0 and s < self.total:
                    self.save(g)
        if bar is not None:
            bar.close()
        if opt.stop_requested and g < self.total:
            self.save(g)
            print0(rank, f"stopped early at global step {g} on request (SIGUSR1); resume with --resume")
            return EXIT_PREEMPTED
        result = self.evaluate()
        wall = time.monotonic() - start
        if cfg.verify_every:
            metrics.write(dict(type="verify", step=g, **self.verify(g)))
        print0(rank, eval_line(g, result))
        metrics.write(dict(type="eval", step=g, time=wall, **result))
        self.save(g)
        mean_step = float(np.mean(step_times)) if step_times else 0.0
        summary = dict(type="summary", mode=cfg.mode, size=self.size,
                       backup_workers=cfg.backup_workers if cfg.mode == "backup" else 0, steps=g, wall_s=wall,
                       mean_step_s=mean_step, dropped_counts=dropped_counts,
                       **{f"final_{k}": v for k, v in result.items()})
        metrics.write(summary)
        print0(rank, f"done: {g} steps in {wall:.1f}s, {mean_step * 1e3:.1f} ms/step, top1 {result['top1']:.4f}, "
                      f"dropped per rank {dropped_counts}")
        return EXIT_OK

    def _log_step(self, rec: StepRecord, metrics: MetricsFile, bar, start: float) -> None:
        if self.rank != 0:
            return
        last = self.opt.last_step
        wait = last.wait_s if last is not None and last.step == rec.step else 0.0
        lr = self.lr_at(rec.step)
        loss = rec.mean_loss
        metrics.write(dict(type="step", step=rec.step, time=time.monotonic() - start, loss=loss, lr=lr,
                           count=rec.count, size=rec.size, included=list(rec.included), dropped=list(rec.dropped),
                           closed_by=rec.closed_by, quorum=rec.quorum, step_s=rec.duration_s, wait_s=wait,
                           arrival_s=list(rec.arrival_s), compute_s=list(rec.compute_s),
                           **({} if rec.staleness is None else {"staleness": rec.staleness}),
                           **({"detached": list(rec.detached)} if rec.detached else {})))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-", inc=f"{rec.count}/{rec.size}")
        elif rec.step % self.cfg.print_freq == 0:
            print(format_step(step=rec.step, loss=loss, lr=lr, count=rec.count, size=rec.size, dropped=rec.dropped,
                              step_s=rec.duration_s, wait_s=wait), flush=True)
