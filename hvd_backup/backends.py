"""Where the per-step allreduce runs: Horovod (the default) or plain mpi4py.

Both expose the same small interface (:class:`hvd_backup.protocol.Backend`), used only from the protocol's
communication thread: ``start(tensor, name, compress)`` posts an in-place nonblocking sum and returns a handle,
``done(handle)`` polls it without blocking, ``finish(handle)`` completes it. ``comm`` is the mpi4py communicator
whose ranks are the backend's ranks; the arrival counter lives on it. ``drives_progress`` says whether the backend
keeps entering MPI by itself (then the communication thread leaves MPI's progress to it).
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from .settings import BACKENDS

__all__ = ["BACKENDS", "MPI_TYPES", "HorovodBackend", "MPIBackend", "make_backend"]

# The torch dtypes that mpi4py reduces, and their MPI datatypes.
MPI_TYPES = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE}


class HorovodBackend:
    """Horovod's allreduce (MPI, Gloo or NCCL underneath); the counter uses ``MPI.COMM_WORLD``."""

    name = "horovod"
    # With Horovod's MPI controller its background thread is inside MPI every cycle, which also progresses the
    # counter's one-sided operations; a second thread polling MPI beside it slows Horovod's allreduce (the two
    # contend for MPI's progress engine: 6M parameters across two hosts, 2 ranks, 1 Gbit/s: 344 ms a step with
    # our polling, 294 ms without, Horovod's optimizer 288 ms).
    drives_progress = True

    def __init__(self, comm: MPI.Intracomm | None = None, compression=None):
        import horovod.torch as hvd

        if not hvd.is_initialized():
            raise RuntimeError("hvd_backup: backend='horovod' needs hvd.init() before DistributedOptimizer(...)")
        self.hvd = hvd
        self.drives_progress = bool(hvd.mpi_enabled())  # not with Gloo's controller (horovodrun --gloo)
        self.compression = compression  # Horovod's Compression.fp16 and the like, for the gradients only
        self.exact = compression is None or compression is hvd.Compression.none
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        if (hvd.size(), hvd.rank()) != (self.comm.Get_size(), self.comm.Get_rank()):
            raise RuntimeError(
                f"hvd_backup: Horovod rank {hvd.rank()} of {hvd.size()} is MPI rank {self.comm.Get_rank()} of "
                f"{self.comm.Get_size()}: initialise Horovod with hvd.init(comm=...) on the communicator you pass "
                "as comm=, or launch with horovodrun/mpirun so both use the world"
            )

    def use(self, ranks: tuple[int, ...]) -> None:
        if ranks != tuple(range(self.comm.Get_size())):
            raise RuntimeError("hvd_backup: backend='horovod' reduces over every rank (detach_after needs 'mpi')")

    def start(self, tensor: torch.Tensor, name: str, compress: bool = False):
        sent, ctx = (self.compression.compress(tensor) if compress and self.compression is not None
                     else (tensor, None))
        if sent.dtype == torch.bfloat16:  # Horovod's CPU allreduce refuses bfloat16: sum in float32
            sent, ctx = sent.float(), None
        return self.hvd.allreduce_async_(sent, name=name, op=self.hvd.Sum), tensor, sent, ctx

    def done(self, handle) -> bool:
        return bool(self.hvd.poll(handle[0]))

    def finish(self, handle) -> None:
        # Only after done() is true: hvd.synchronize spins on a CPU core while it waits.
        request, tensor, sent, ctx = handle
        self.hvd.synchronize(request)
        if sent is not tensor:
            tensor.copy_(sent if ctx is None else self.compression.decompress(sent, ctx))

    def free(self) -> None:
        pass  # Horovod's own state outlives the optimizer (hvd.shutdown() is the user's)


class _MPIHandle:
    __slots__ = ("request", "tensor", "staged")

    def __init__(self, request, tensor, staged):
        self.request, self.tensor, self.staged = request, tensor, staged


class MPIBackend:
    """``MPI_Iallreduce`` through mpi4py on a private duplicate of ``comm``; GPU tensors are staged on the host,
    16-bit ones (which MPI cannot sum) in float32."""

    name = "mpi"
    drives_progress = False  # only the communication thread enters MPI
    exact = True

    def __init__(self, comm: MPI.Intracomm | None = None):
        self.comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self._everyone = tuple(range(self.comm.Get_size()))
        self._active = self.comm
        self._subsets: dict[tuple[int, ...], MPI.Intracomm] = {}

    def use(self, ranks: tuple[int, ...]) -> None:
        """Sum over ``ranks`` of ``comm`` only, from the next ``start`` on (the ranks that are detached, see
        :mod:`hvd_backup.protocol.detach`, take no part). The first use of a set creates its communicator:
        collective over those ranks, and only them."""
        if ranks == self._everyone:
            self._active = self.comm
            return
        comm = self._subsets.get(ranks)
        if comm is None:
            group = self.comm.Get_group()
            members = group.Incl(list(ranks))
            comm = self.comm.Create_group(members)
            members.Free()
            group.Free()
            self._subsets[ranks] = comm
        self._active = comm

    def start(self, tensor: torch.Tensor, name: str, compress: bool = False):
        if tensor.dtype in (torch.float16, torch.bfloat16):
            staged = tensor.float().cpu()
        elif tensor.dtype not in MPI_TYPES:
            raise TypeError(f"hvd_backup: backend='mpi' reduces floating tensors, got {tensor.dtype}")
        else:
            staged = tensor.cpu() if tensor.device.type != "cpu" else None
        host = staged if staged is not None else tensor
        request = self._active.Iallreduce(MPI.IN_PLACE, [host.numpy(), MPI_TYPES[host.dtype]], op=MPI.SUM)
        return _MPIHandle(request, tensor, staged)

    def done(self, handle: _MPIHandle) -> bool:
        return bool(handle.request.Test())

    def finish(self, handle: _MPIHandle) -> None:
        handle.request.Wait()
        if handle.staged is not None:
            handle.tensor.copy_(handle.staged)

    def free(self) -> None:
        for comm in self._subsets.values():
            comm.Free()
        self._subsets.clear()
        self.comm.Free()


def make_backend(name: str, comm: MPI.Intracomm | None = None, compression=None):
    if name == "horovod":
        return HorovodBackend(comm, compression)
    if name == "mpi":
        return MPIBackend(comm)
    raise ValueError(f"backend={name!r} is not one of {', '.join(map(repr, BACKENDS))}")
