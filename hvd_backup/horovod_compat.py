"""Horovod's ``DistributedOptimizer`` keywords, with Horovod's meaning, so a script that changes only the class
name keeps working: or a clear error that names what to use instead."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

__all__ = ["Compression", "HorovodOptions", "resolve"]


class _Cast:
    """A compressor in Horovod's form: floating gradients travel as ``dtype``, and come back as they were."""

    def __init__(self, dtype: torch.dtype, name: str):
        self.dtype, self.name = dtype, name

    def compress(self, tensor: torch.Tensor):
        if tensor.dtype.is_floating_point and tensor.dtype != self.dtype:
            return tensor.to(self.dtype), tensor.dtype
        return tensor, None

    def decompress(self, tensor: torch.Tensor, ctx):
        return tensor if ctx is None else tensor.to(ctx)

    def __repr__(self) -> str:
        return f"Compression.{self.name}"


class Compression:
    """``hvd.Compression``'s choices: the gradients' allreduce in 16 bits (backend="horovod")."""

    none = None
    fp16 = _Cast(torch.float16, "fp16")


_OPS = {0: "average", 1: "sum", 2: "adasum", "average": "average", "sum": "sum", "adasum": "adasum"}


@dataclass(frozen=True)
class HorovodOptions:
    compression: object | None  # None, or an object with compress(tensor) -> (tensor, ctx) and decompress
    op: str  # "average" or "sum" over the included ranks
    predivide: float
    backward_passes_per_step: int
    groups: object
    num_groups: int
    sparse_as_dense: bool


def _compression(value, backend: str):
    if value is None or getattr(value, "__name__", "") == "NoneCompressor":
        return None
    if getattr(value, "__name__", "") == "FP16Compressor":  # horovod.torch.Compression.fp16
        value = Compression.fp16
    if not (callable(getattr(value, "compress", None)) and callable(getattr(value, "decompress", None))):
        raise ValueError(f"hvd_backup: compression={value!r} must be hvd.Compression.none or .fp16")
    if value.compress(torch.zeros(1))[0].dtype == torch.bfloat16:
        raise ValueError(f"hvd_backup: compression={value!r} sends bfloat16, which Horovod 0.28's allreduce "
                         "refuses: use hvd.Compression.fp16")
    if backend != "horovod":
        raise ValueError(f"hvd_backup: compression={value!r} needs backend='horovod' (MPI has no 16-bit sum); "
                         "use compression=None with backend='mpi'")
    return value


def resolve(*, backend: str, compression, backward_passes_per_step, op, gradient_predivide_factor, num_groups,
            groups, sparse_as_dense, process_set) -> HorovodOptions:
    """Check Horovod's keywords; raise ``ValueError`` naming a value this optimizer cannot honour."""
    name = _OPS.get(op if not isinstance(op, str) else op.lower()) if op is not None else "average"
    if name is None:
        raise ValueError(f"hvd_backup: op={op!r} must be hvd.Average (the default) or hvd.Sum")
    if name == "adasum":
        raise ValueError("hvd_backup: op=hvd.Adasum is not supported with backup workers (Adasum combines every "
                         "rank's gradient pairwise, while a step here has only the first N - b): use op=hvd.Average")
    if not isinstance(gradient_predivide_factor, numbers.Real) or not gradient_predivide_factor > 0:
        raise ValueError(f"hvd_backup: gradient_predivide_factor={gradient_predivide_factor!r} must be > 0")
    if gradient_predivide_factor != 1.0 and name != "average":
        raise ValueError("hvd_backup: gradient_predivide_factor needs op=hvd.Average (as in Horovod)")
    if not isinstance(backward_passes_per_step, numbers.Integral) or backward_passes_per_step < 1:
        raise ValueError(f"hvd_backup: backward_passes_per_step={backward_passes_per_step!r} must be an integer >= 1")
    if not isinstance(num_groups, numbers.Integral) or num_groups < 0:
        raise ValueError(f"hvd_backup: num_groups={num_groups!r} must be an integer >= 0")
    if groups is not None and not (isinstance(groups, numbers.Integral) and groups >= 0) \
            and not (isinstance(groups, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in groups)):
        raise ValueError(f"hvd_backup: groups={groups!r} must be None, a number of groups, or a list of lists of "
                         "parameters")
    if process_set is not None and getattr(process_set, "process_set_id", 0) != 0:
        raise ValueError(f"hvd_backup: process_set={process_set!r}: only the global process set is supported; for "
                         "a subset of ranks pass comm= (an mpi4py communicator of those ranks)")
    return HorovodOptions(_compression(compression, backend), name, float(gradient_predivide_factor),
                          int(backward_passes_per_step), groups, int(num_groups), bool(sparse_as_dense))
