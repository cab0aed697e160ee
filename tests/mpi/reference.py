"""What the protocol must compute, worked out in one process from what each rank handed in: the reference the
multi-rank tests compare against, bit for bit.

docs/PROTOCOL.md, steps 1-5: each global step includes the ranks whose arrivals read a counter value below the
step's count; every rank applies the wrapped optimizer's update to the mean of the included gradients (their
sum divided by their count), with the hyper-parameters of the step's first arriver; a gradient counts only for
the step whose parameters it was computed on, and a rank that falls behind is brought to the current
parameters and optimizer state. This module models exactly that with a plain torch optimizer of the same class,
from:

* per rank, every gradient it handed in (:class:`HandedIn`): the version of the parameters it was computed on,
  those parameters, the gradient, and its optimizer's hyper-parameters at that moment;
* per rank, the value each of its arrivals read from its step's counter word (0: the first arriver; at least
  the step's count: too late, or after a close);
* per step, the count of included gradients the records report.

It decides from those who was in and whose hyper-parameters apply, checks the records against that, checks that
every gradient was computed on the parameters the model holds at that version (so catch-ups brought ranks to
the right state), and returns the parameters and optimizer state every rank must end with. It does not import
hvd_backup. For the sums to be exact in any order (MPI's reduction order is its own), the tests hand in
gradients that are multiples of 2**-10 (:func:`exact`); the division by the count is then the only rounding,
the same one the protocol does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["HandedIn", "Mismatch", "RankLog", "check_final", "exact", "replay", "same_state"]

GRID = 2.0 ** -10


def exact(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` rounded to a multiple of 2**-10 (and -0 made +0), so that any sum of a few is exact."""
    return torch.round(grad / GRID) * GRID + 0.0


@dataclass
class HandedIn:
    """One gradient a rank handed in with ``step()``."""

    version: int  # the global step of the parameters it was computed on
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    hyper: list[dict]  # per parameter group, every entry but "params"


@dataclass
class RankLog:
    """Everything one rank did in a run, and the state it ended with."""

    rank: int
    handed_in: list[HandedIn]
    arrivals: dict[int, int]  # step -> the counter value its arrival read
    final_step: int
    final_params: list[torch.Tensor]
    final_state: list[dict] = field(default_factory=list)  # per parameter, the optimizer's state


class Mismatch(AssertionError):
    """The run differs from the reference."""


def same_state(a: dict, b: dict) -> bool:
    """Optimizer state of one parameter, bit for bit."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _equal(xs, ys) -> bool:
    return len(xs) == len(ys) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(xs, ys))


def replay(initial: list[torch.Tensor], make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
           records, logs: list[RankLog]) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the steps of ``records`` (``step``, ``count``, ``included``; oldest first, from step 0) from the
    parameters ``initial`` on ``make_optimizer(params)``; raise :class:`Mismatch` where the run differs from the
    model. Returns the final parameters and, per parameter, the optimizer's state."""
    params = [torch.nn.Parameter(t.detach().clone()) for t in initial]
    opt = make_optimizer(params)
    by_version = [{h.version: h for h in log.handed_in} for log in logs]
    for log in logs:
        versions = [h.version for h in log.handed_in]
        if len(set(versions)) != len(versions):
            raise Mismatch(f"rank {log.rank} handed in two gradients for one version: {versions}")
    for expected_step, rec in enumerate(records):
        t = rec.step
        if t != expected_step:
            raise Mismatch(f"records skip from step {expected_step - 1} to {t}")
        for rank, handed in enumerate(by_version):
            h = handed.get(t)
            if h is not None and not _equal(h.params, [p.detach() for p in params]):
                raise Mismatch(f"step {t}: rank {rank} computed its gradient on parameters other than the "
                               f"reference's at global step {t} (an update before differs, or a catch-up)")
        orders = {log.rank: log.arrivals[t] for log in logs if t in log.arrivals}
        included = tuple(sorted(r for r, value in orders.items() if value < rec.count))
        if rec.included != included or rec.count != len(included):
            raise Mismatch(f"step {t}: the records say {rec.count} included, ranks {list(rec.included)}; the "
                           f"arrival orders {orders} say ranks {list(included)}")
        if sorted(orders[r] for r in included) != list(range(len(included))):
            raise Mismatch(f"step {t}: included ranks read orders {[orders[r] for r in included]}")
        for r in included:
            if t not in by_version[r]:
                raise Mismatch(f"step {t}: rank {r} arrived without handing in a gradient of version {t}")
        first = next(r for r in included if orders[r] == 0)
        flat = torch.stack([torch.cat([g.reshape(-1) for g in by_version[r][t].grads]) for r in included]).sum(0)
        flat.div_(len(included))
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        for group, hyper in zip(opt.param_groups, by_version[first][t].hyper):
            group.update(hyper)
        opt.step()
    return [p.detach() for p in params], [opt.state.get(p, {}) for p in params]


def check_final(logs: list[RankLog], params: list[torch.Tensor], states: list[dict], steps: int) -> None:
    """Every rank ended at global step ``steps`` with the reference's parameters and optimizer ``states``."""
    for log in logs:
        if log.final_step != steps:
            raise Mismatch(f"rank {log.rank} ended at global step {log.final_step}, the records at {steps}")
        for i, (mine, ref) in enumerate(zip(log.final_params, params)):
            if not torch.equal(mine, ref):
                diff = (mine - ref).abs().max().item()
                raise Mismatch(f"rank {log.rank}: parameter {i} differs from the reference by up to {diff:.3g}")
        for i, (mine, ref) in enumerate(zip(log.final_state, states)):
            if not same_state(mine, ref):
                raise Mismatch(f"rank {log.rank}: the optimizer state of parameter {i} differs from the reference: "
                               f"{sorted(mine)} vs {sorted(ref)}")
