"""Evaluation on the whole test set and the bit-identity check, both collective, both able to look at the
parameters of an exact global step (a snapshot) rather than the live ones."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch
from mpi4py import MPI

from ..errors import ProtocolError
from .data import eval_loader

__all__ = ["Evaluator", "eval_line", "verify"]


class Evaluator:
    """Top-1/top-5 and loss over the whole test set, each rank taking its share."""

    def __init__(self, model, test_set, comm, *, batch_size: int, workers: int, num_classes: int, autocast):
        self.model, self.test_set, self.comm = model, test_set, comm
        self.batch_size, self.workers, self.num_classes, self.autocast = batch_size, workers, num_classes, autocast
        self._copy = None

    def __call__(self, params=None) -> dict:
        """Collective. ``params`` (in ``model.parameters()`` order) replace the model's for this evaluation."""
        model = self.model
        if params is not None:
            if self._copy is None:
                self._copy = copy.deepcopy(self.model)
            model = self._copy
            model.load_state_dict(self.model.state_dict())
            with torch.no_grad():
                for p, value in zip(model.parameters(), params):
                    p.copy_(value)
        device = next(model.parameters()).device
        loader = eval_loader(self.test_set, rank=self.comm.Get_rank(), size=self.comm.Get_size(),
                             batch_size=self.batch_size, workers=self.workers, pin_memory=device.type == "cuda")
        sums = np.zeros(4)  # top-1 hits, top-5 hits, loss sum, samples
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.autocast():
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                top = out.topk(min(5, out.shape[1]), dim=1).indices
                sums += [float((top[:, 0] == y).sum()), float((top == y[:, None]).any(1).sum()),
                         float(torch.nn.functional.cross_entropy(out.float(), y, reduction="sum")), len(y)]
        model.train(was_training)
        self.comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        n = max(1.0, sums[3])
        return {"top1": sums[0] / n, "top5": sums[1] / n if self.num_classes > 5 else None,
                "loss": sums[2] / n, "samples": int(sums[3])}


def eval_line(step: int, r: dict) -> str:
    top5 = "" if r["top5"] is None else f" top5 {r['top5']:.4f}"
    return f"eval step {step:>7d} | top1 {r['top1']:.4f}{top5} | loss {r['loss']:.4f} | {r['samples']} samples"


def verify(comm, step: int, params) -> dict:
    """Collective: check that every rank holds bit-identical ``params`` at global ``step``."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = comm.allgather(h.hexdigest())
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ProtocolError(f"step {step}: parameters of ranks {differ} differ from rank 0's")
    return {"ok": True, "digest": digests[0][:16]}
