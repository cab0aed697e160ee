"""``torch.amp.GradScaler`` with backup workers: the scaler hands itself to ``step()`` (the optimizer says it
handles scaling), the gradients are unscaled before they travel, an overflow in the sum of the included
gradients makes every rank skip the same step, and every rank's scaler goes through the same updates, one per
global step, also a rank that skipped steps by catching up. So scales and parameters stay identical."""

from __future__ import annotations

import warnings

import torch
from torch.amp.grad_scaler import OptState

__all__ = ["after_step", "before_step"]

# GradScaler warns that it will stop handing itself to optimizers that ask for it; until it does, that is how an
# optimizer that reduces across ranks learns the scale and reports one overflow verdict for all ranks.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def before_step(scaler, opt) -> torch.Tensor | None:
    """The factor that unscales this rank's gradients (``None`` if the user already called ``unscale_``)."""
    state = scaler._per_optimizer_states[id(opt)]
    if state["stage"] is OptState.UNSCALED:
        return None
    return scaler._scale.double().reciprocal().float()


def after_step(scaler, opt, covered: list[bool]) -> None:
    """The scaler's update for every global step this ``step()`` covered but the last, in order; the last one's
    overflow verdict is left for the user's ``scaler.update()``."""
    device = scaler._scale.device
    for skipped in covered[:-1]:
        torch._amp_update_scale_(scaler._scale, scaler._growth_tracker,
                                 torch.full((1,), float(skipped), device=device), scaler._growth_factor,
                                 scaler._backoff_factor, scaler._growth_interval)
    last = float(covered[-1]) if covered else 0.0
    scaler._per_optimizer_states[id(opt)]["found_inf_per_device"] = {device: torch.full((1,), last, device=device)}
