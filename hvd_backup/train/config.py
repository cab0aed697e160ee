"""The training job's configuration: one dataclass, one docstring per field, checks in ``__post_init__``,
and the command line generated from it (flag names follow pytorch/examples' imagenet/main.py)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field


from .. import settings as rules
from ..errors import UserError
from .catalog import DATASETS, default_epochs, default_lr, default_warmup

__all__ = ["ConfigError", "TrainConfig", "parse_args"]


class ConfigError(UserError):
    """A bad command-line value."""


def _f(help: str, *flags: str, **kw):
    return field(default=kw.pop("default", None), metadata={"help": help, "flags": flags, **kw})


@dataclass
class TrainConfig:
    # data
    dataset: str = _f("digits (embedded, default), cifar10, imagenet or synthetic", "--dataset", default="digits",
                      choices=DATASETS)
    data: str | None = _f("data directory: cifar-10-batches-py/'s parent, or ImageNet's root with train/ and val/",
                          "--data")
    download: bool = _f("download CIFAR-10 into --data if missing", "--download", default=False)
    image_size: int = _f("image size (imagenet, synthetic)", "--image-size", default=224)
    num_classes: int = _f("classes of the synthetic data set", "--num-classes", default=1000)
    synthetic_size: int = _f("training samples of the synthetic data set", "--synthetic-size", default=10_000)
    workers: int | None = _f("DataLoader worker processes per rank (default: 0 for digits/synthetic, 4 else)",
                             "-j", "--workers")
    # model and optimisation
    arch: str | None = _f("digits_cnn, cifar_resnet18 or any torchvision.models name (default per data set)",
                          "-a", "--arch")
    batch_size: int = _f("batch size per rank", "-b", "--batch-size", default=32)
    epochs: float | None = _f("epochs to train; an epoch takes every rank through its shard once "
                              "(default: digits 15, cifar10 30, imagenet 90, synthetic 1)", "--epochs")
    steps: int | None = _f("global steps to train (overrides --epochs)", "--steps")
    lr: float | None = _f("learning rate for a batch of --lr-base-batch samples, scaled by (N-b)*batch/base "
                          "(default: 0.2 for digits, 0.1 otherwise)", "--lr")
    lr_base_batch: int = _f("the batch size --lr is given for", "--lr-base-batch", default=256)
    lr_schedule: str = _f("cosine or step", "--lr-schedule", default="cosine", choices=("cosine", "step"))
    lr_step_epochs: str = _f("epochs at which the step schedule multiplies the rate by --lr-gamma",
                             "--lr-step-epochs", default="30,60,80")
    lr_gamma: float = _f("factor of the step schedule", "--lr-gamma", default=0.1)
    warmup_steps: int | None = _f("linear warm-up steps (default: 10 for digits, 0 otherwise)", "--warmup-steps")
    momentum: float = _f("SGD momentum", "--momentum", default=0.9)
    weight_decay: float = _f("weight decay", "--wd", "--weight-decay", default=1e-4)
    label_smoothing: float = _f("label smoothing", "--label-smoothing", default=0.0)
    amp: bool = _f("bfloat16 autocast on GPU", "--amp", default=False)
    channels_last: bool = _f("channels-last (NHWC) memory for the model and its inputs: faster convolutions on GPUs "
                             "with --amp; not with --mode sync on Horovod, whose allreduce needs contiguous gradients",
                             "--channels-last", default=False)
    seed: int = _f("seed of data order, initialisation and injected delays", "--seed", default=0)
    # distribution
    mode: str = _f("backup (this project's optimizer), sync (hvd.DistributedOptimizer) or async", "--mode",
                   default="backup", choices=("backup", "sync", "async"))
    backend: str = _f("horovod or mpi (mpi needs no Horovod)", "--backend", default="horovod", choices=("horovod", "mpi"))
    backup_workers: int | str = _f("b: each step does without the b slowest ranks; 'auto' re-chooses b every "
                                   "--auto-every steps, up to --max-backup-workers", "--backup-workers", default=1,
                                   parse="int_or_auto")
    auto_every: int = _f("with --backup-workers auto: steps between choices of b", "--auto-every", default=50)
    max_backup_workers: int | None = _f("with --backup-workers auto: the largest b (default N // 4)",
                                        "--max-backup-workers")
    straggler_timeout: float | None = _f("close a step this many seconds after its first arrival",
                                         "--straggler-timeout")
    min_workers: int | None = _f("fewest ranks a timeout may close a step with", "--min-workers")
    hang_timeout: float = _f("fail the job when a step is stuck this long (seconds)", "--hang-timeout", default=600.0)
    max_lag: int | None = _f("fail when a rank falls this many steps behind", "--max-lag")
    detach_after: int | None = _f("with --backend mpi: detach a rank blamed for this many slow steps in a row (its "
                                  "link is slow): the others reduce without it until it is attached again by a "
                                  "state transfer", "--detach-after")
    overlap: bool = _f("hand the gradients in bucket by bucket during the backward pass, so that their allreduces "
                       "run while it goes on", "--overlap", default=False)
    bucket_cap_mb: float = _f("with --overlap: about how many MiB of gradient each bucket holds", "--bucket-cap-mb",
                              default=25.0)
    straggler: str | None = _f("inject delays, e.g. 'fixed:delay=0.5,rank=3' (see mpi_tools.straggler)",
                               "--straggler")
    # output
    eval_every: int = _f("evaluate every this many global steps (0: only at the end)", "--eval-every", default=0)
    verify_every: int = _f("check every this many global steps that all ranks hold bit-identical parameters "
                           "(0: never)", "--verify-every", default=0)
    print_freq: int = _f("print a step line every this many steps", "-p", "--print-freq", default=10)
    metrics: str | None = _f("write JSON-lines metrics here (one record per step and per evaluation)", "--metrics")
    checkpoint_dir: str | None = _f("write checkpoints here", "--checkpoint-dir")
    checkpoint_every: int = _f("checkpoint every this many global steps (0: only at the end)",
                               "--checkpoint-every", default=0)
    keep_checkpoints: int = _f("keep this many newest checkpoints", "--keep-checkpoints", default=3)
    resume: str | None = _f("resume from this checkpoint ('latest': the newest in --checkpoint-dir)", "--resume",
                            nargs="?", const="latest")
    evaluate: bool = _f("only evaluate (the --resume checkpoint, or the initial model)", "-e", "--evaluate",
                        default=False)
    progress: str = _f("auto (a bar on a terminal, lines otherwise), bar or lines", "--progress", default="auto",
                       choices=("auto", "bar", "lines"))

    def __post_init__(self):
        def need(ok, message):
            if not ok:
                raise ConfigError(message)

        positive = ("image_size", "num_classes", "synthetic_size", "batch_size", "lr_base_batch", "print_freq",
                    "keep_checkpoints")
        for name in positive:
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        for name in ("eval_every", "checkpoint_every", "verify_every"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        need(self.warmup_steps is None or self.warmup_steps >= 0, f"--warmup-steps {self.warmup_steps}: must be >= 0")
        need(self.workers is None or self.workers >= 0, f"--workers {self.workers}: must be >= 0")
        if self.epochs is None:
            self.epochs = default_epochs(self.dataset)
        if self.lr is None:
            self.lr = default_lr(self.dataset)
        if self.warmup_steps is None:
            self.warmup_steps = default_warmup(self.dataset)
        need(math.isfinite(self.epochs) and self.epochs > 0, f"--epochs {self.epochs}: must be > 0")
        need(self.steps is None or self.steps >= 1, f"--steps {self.steps}: must be >= 1")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr {self.lr}: must be > 0")
        need(0 <= self.momentum < 1, f"--momentum {self.momentum}: must be in [0, 1)")
        need(self.weight_decay >= 0, f"--wd {self.weight_decay}: must be >= 0")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")
        need(0 < self.lr_gamma <= 1, f"--lr-gamma {self.lr_gamma}: must be in (0, 1]")
        try:
            self.step_epochs = [float(x) for x in self.lr_step_epochs.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--lr-step-epochs {self.lr_step_epochs!r}: must be numbers separated by commas") from None
        self._check_optimizer_settings(size=None)
        need(not (self.verify_every and self.mode == "async"),
             "--verify-every: not with --mode async, whose ranks hold different parameters by design")
        need(not (self.checkpoint_every and not self.checkpoint_dir), "--checkpoint-every needs --checkpoint-dir")
        need(not (self.resume == "latest" and not self.checkpoint_dir),
             "--resume without a path needs --checkpoint-dir to find the latest checkpoint")
        need(not (self.channels_last and self.mode == "sync" and self.backend == "horovod"),
             "--channels-last: not with --mode sync on --backend horovod (hvd.DistributedOptimizer needs contiguous "
             "gradients); use --mode backup --backup-workers 0 for plain synchronous SGD")
        if self.workers is None:
            self.workers = 0 if self.dataset in ("digits", "synthetic") else 4

    def _check_optimizer_settings(self, size: int | None) -> None:
        """The optimizer's own rules (:mod:`hvd_backup.settings`), spelled as flags."""
        values = {name: getattr(self, name) for name in OPTIMIZER_SETTINGS}
        if self.mode != "backup":
            values.pop("backup_workers")
            values.pop("min_workers")
            values.pop("detach_after")
        else:
            values["backend"] = self.backend
        try:
            rules.check(values, size=size, spell=lambda name, value: f"--{name.replace('_', '-')} {value}:",
                        optional="")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def check_world(self, size: int) -> None:
        """Checks that need the number of ranks (and nothing heavier: no torch, no data)."""
        from mpi_tools.straggler import StragglerInjector

        self._check_optimizer_settings(size=size)
        try:
            StragglerInjector(self.straggler, rank=0, size=size, seed=self.seed)
        except ValueError as exc:
            raise ConfigError(f"--straggler: {exc}") from None

    def public(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


OPTIMIZER_SETTINGS = ("backup_workers", "auto_every", "max_backup_workers", "straggler_timeout", "min_workers",
                      "hang_timeout", "max_lag", "detach_after", "overlap", "bucket_cap_mb")


def _int_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: an integer or 'auto'") from None


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block: the launcher prints it once per rank
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="hvd-backup-train",
        description="Data-parallel training with backup workers (launch with horovodrun, mpirun or srun).",
    )
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        flags, help_text = meta.pop("flags"), meta.pop("help")
        default = f.default
        if f.type == "bool":
            parser.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
        if meta.pop("parse", None) == "int_or_auto":
            kind = _int_or_auto
        if default is not None:
            help_text += f" (default: {default})"
        parser.add_argument(*flags, dest=f.name, type=kind, default=default, help=help_text, **meta)
    return parser


def parse_args(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))
