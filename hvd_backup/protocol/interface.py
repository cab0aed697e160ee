"""What the step engine needs from the tensor side and from the allreduce backend, written down."""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["Backend", "TensorSide"]


class TensorSide(Protocol):
    """The tensors one rank's protocol moves (implemented by :class:`hvd_backup.tensors.Consensus`).

    The training thread fills ``send`` and waits; only then does the communication thread call the methods
    below, so nothing here needs a lock.
    """

    device: torch.device
    numel: int  # gradient elements: the first ``numel`` of ``send`` and ``zeros``, one per parameter element
    send: torch.Tensor  # the training thread's flat gradient buffer (then the communication thread's reserve)
    zeros: torch.Tensor  # the same shape, owned by the communication thread (what a rank not included sends)
    present: torch.Tensor  # float64, per parameter: 1 where this rank's gradient in `send` has one

    def reserve(self, extra: int) -> None:
        """Make ``send`` and ``zeros`` ``extra`` elements longer than the gradients (before the first hand-in)."""

    def apply_live(self, flat: torch.Tensor, hyper: list[float], present: torch.Tensor, *,
                   skip: bool = False) -> None:
        """Apply the reduced, reweighted ``flat`` to the live parameters with the step's hyper-parameters; a
        parameter not ``present`` gets no gradient; ``skip``: set the gradients, apply no update."""

    def apply_consensus(self, flat: torch.Tensor, hyper: list[float], present: torch.Tensor, *,
                        skip: bool = False) -> None:
        """The same update, on the consensus copy (this rank's training thread is behind)."""

    def sync_consensus(self) -> None:
        """Consensus := live (the live parameters are at the current step)."""

    def restore_live(self) -> None:
        """Live := consensus: the catch-up."""

    def export_state(self, live: bool) -> bytes:
        """The parameters and optimizer state, live or the consensus copy's, as bytes (a detached rank's join)."""

    def import_state(self, data: bytes) -> None:
        """Consensus := what :meth:`export_state` wrote on another rank."""

    def live_params(self) -> list[torch.Tensor]:
        """The live parameters, in ``param_groups`` order (for snapshots)."""

    def consensus_params(self) -> list[torch.Tensor]:
        """The consensus copy's parameters, in the same order."""


class Backend(Protocol):
    """A nonblocking in-place sum over the ranks of ``comm`` (:mod:`hvd_backup.backends`)."""

    name: str
    comm: Any  # the mpi4py communicator whose ranks are the backend's ranks
    drives_progress: bool  # a thread of its own enters MPI all the time (which serves the counter's host too)
    exact: bool  # gradients are summed as sent (no compression): metadata can travel in their buffer

    def use(self, ranks: tuple[int, ...]) -> None:
        """Sum over these ranks of ``comm`` only from the next ``start`` on (collective over them the first time
        a set is used; only the ``mpi`` backend leaves ranks out)."""

    def start(self, tensor: torch.Tensor, name: str, compress: bool = False) -> Any:
        """Post the sum of ``tensor`` over all ranks, in place (``compress``: in the backend's compressed form,
        for gradients); return a handle."""

    def done(self, handle: Any) -> bool:
        """Whether the sum has completed (never blocks)."""

    def finish(self, handle: Any) -> None:
        """Complete a sum that is ``done``."""

    def free(self) -> None:
        """Release what the backend holds. Collective."""
