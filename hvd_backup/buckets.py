"""Gradient buckets for ``overlap=True``: the flat gradient buffer cut into element ranges in the order the
backward pass produces gradients (the last parameters first, as DDP does: a small first bucket, then about
``bucket_cap_mb`` each), and autograd hooks that copy each gradient into its place as soon as it is accumulated
and tell the protocol when a bucket is complete, so that its allreduce runs while the backward pass goes on.

What a user's loop can rely on then is Horovod's rule: the gradients travel as ``backward()`` leaves them, so
gradient accumulation needs ``backward_passes_per_step`` (a gradient produced once more before ``step()`` raises,
as in Horovod), and an edit of ``.grad`` between ``backward()`` and ``step()`` does not travel (clip or edit the
averaged gradient in a step pre-hook instead). Parameters whose hooks never fire in a step (frozen, unused, or
gradients set by hand) are handed in by ``step()`` with the rest.
"""

from __future__ import annotations

import torch

__all__ = ["Buckets", "bucket_groups"]


def bucket_groups(sizes: list[int], itemsize: int, cap_mb: float, first_mb: float = 1.0) -> list[range]:
    """Parameter indices per bucket for parameters of ``sizes`` elements (in the optimizer's order), grouped from
    the last parameter backwards: the first bucket holds about ``first_mb``, each later one about ``cap_mb``."""
    groups, hi, filled, cap = [], len(sizes), 0, min(first_mb, cap_mb)
    for i in range(len(sizes) - 1, -1, -1):
        filled += sizes[i] * itemsize
        if filled >= cap * 2**20 and i > 0:
            groups.append(range(i, hi))
            hi, filled, cap = i, 0, cap_mb
    groups.append(range(0, hi))
    return groups


class Buckets:
    """The hooks of one wrapped optimizer (``overlap=True``); ``engine.bucket_ready(j)`` is told of each bucket
    as it completes. Training thread only."""

    def __init__(self, side, engine, groups: list[range], passes: int = 1):
        self.side, self.engine, self.passes = side, engine, passes
        self.bucket_of = [0] * len(side.params)
        for j, group in enumerate(groups):
            for i in group:
                self.bucket_of[i] = j
        # Parameters frozen when wrapped get no hook (autograd allows none); like one frozen later, they are handed
        # in by step(), and so is the bucket that holds them.
        hooked = [p.requires_grad for p in side.params]
        self.members = [len(g) if all(hooked[i] for i in g) else -1 for g in groups]
        self.fired = [0] * len(side.params)
        self.left = list(self.members)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i))
                         for i, p in enumerate(side.params) if hooked[i]]

    def _hook(self, i: int):
        def on_grad(param: torch.Tensor) -> None:
            self.fired[i] += 1
            if self.fired[i] < self.passes:
                return
            if self.fired[i] > self.passes:
                raise RuntimeError(
                    f"hvd_backup: parameter {self.side.names[i]} got a gradient {self.fired[i]} times before "
                    f"step(), with backward_passes_per_step={self.passes} and overlap=True: its gradient has "
                    "already left. Pass backward_passes_per_step=K to accumulate K backward passes per step(), "
                    "or overlap=False")
            if self.side.take_grad(i, param.grad):
                # Accumulated in place into the buffer that is about to travel: an in-place edit before step()
                # (GradScaler.unscale_) must not reach it while its allreduce runs.
                param.grad = param.grad.clone()
            j = self.bucket_of[i]
            self.left[j] -= 1
            if self.left[j] == 0:
                self.engine.bucket_ready(j)
        return on_grad

    @property
    def started(self) -> bool:
        """Whether a gradient of this step has been taken already (its buckets may be on their way)."""
        return any(self.fired)

    def flush(self, rescale: torch.Tensor | None = None) -> None:
        """``step()``: take the gradients of the parameters whose hooks did not fire (times ``rescale``: a
        GradScaler's scale when the user unscaled them, since the others travel scaled)."""
        for i, p in enumerate(self.side.params):
            if self.fired[i] < self.passes:
                self.side.take_grad(i, p.grad, rescale)

    def reset(self) -> None:
        self.fired = [0] * len(self.fired)
        self.left = list(self.members)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
