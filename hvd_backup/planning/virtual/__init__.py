"""A virtual cluster: sync, backup workers and async SGD on N workers' worth of real SGD, in one process.

The trainer's model, data shards, learning-rate rule and schedule and optimizer (a
:class:`~hvd_backup.train.trainer.Trainer` sized for N ranks: :mod:`.job`); N virtual workers whose seconds per
gradient come from a measured trace or a straggler spec (:mod:`.work`) and whose batches come in the trainer's
order (:mod:`.workers`); a simulated clock that decides who arrives when (the planner's
:class:`~hvd_backup.planning.simulate.Schedule` for sync and backup, its
:class:`~hvd_backup.planning.simulate.BucketSchedule` with the gradient in buckets, :mod:`.async_clock` for async) with
communication costs (:mod:`.network`); and the algorithms on top (:mod:`.algorithms`). Only the gradients that
count are computed, so a run costs about steps x (N - b) backward passes however slow the workers are.
``python -m hvd_backup.planning.virtual`` is the command line (:mod:`.cli`).
"""

from .algorithms import train_async, train_steps
from .async_clock import AsyncSchedule
from .job import Overlap, VirtualJob, run
from .network import Network
from .work import BucketTimes, WorkTimes, trace_compute

__all__ = ["AsyncSchedule", "BucketTimes", "Network", "Overlap", "VirtualJob", "WorkTimes", "run", "trace_compute",
           "train_async", "train_steps"]
