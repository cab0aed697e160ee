"""The tensor side of the protocol (:class:`hvd_backup.protocol.TensorSide`): the flat gradient buffers, the
wrapped optimizer's live state, and the consensus copy that a rank whose training thread is behind keeps
current; plus the optimizer's hyper-parameters as a flat list of floats that travels with each step."""

from __future__ import annotations

import copy
import numbers
from collections import OrderedDict, defaultdict

import torch

__all__ = ["Consensus", "Hyper", "copy_state", "flat_views"]


def flat_views(params, flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of the 1-D ``flat`` shaped like each of ``params``, back to back from its start."""
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(flat[offset:offset + n].view_as(p))
        offset += n
    return out


class Hyper:
    """The numeric hyper-parameters of an optimizer's groups, as a flat list of floats and back."""

    def __init__(self, groups):
        self.fields = []  # (group index, key, tuple index or None)
        for gi, group in enumerate(groups):
            for key in sorted(k for k in group if k != "params"):
                value = group[key]
                if isinstance(value, tuple) and value and all(self._numeric(v) for v in value):
                    self.fields.extend((gi, key, i) for i in range(len(value)))
                elif self._numeric(value):
                    self.fields.append((gi, key, None))

    @staticmethod
    def _numeric(value) -> bool:
        if isinstance(value, torch.Tensor):
            return value.numel() == 1
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    def signature(self) -> str:
        return ";".join(f"{g}.{k}.{i}" for g, k, i in self.fields)

    def snapshot(self, groups) -> list[float]:
        out = []
        for gi, key, i in self.fields:
            value = groups[gi][key] if i is None else groups[gi][key][i]
            out.append(float(value))
        return out

    def apply(self, groups, values) -> None:
        for (gi, key, i), value in zip(self.fields, values):
            group = groups[gi]
            if i is not None:
                items = list(group[key])
                items[i] = type(items[i])(value)
                group[key] = tuple(items)
            elif isinstance(group[key], torch.Tensor):
                group[key].fill_(value)
            else:
                group[key] = type(group[key])(value)


def copy_state(src_opt, dst_opt, pairs) -> None:
    """Make ``dst_opt``'s parameters and state equal to ``src_opt``'s; ``pairs`` maps src to dst params."""
    with torch.no_grad():
        for sp, dp in pairs:
            dp.copy_(sp)
            s_state = src_opt.state.get(sp)
            if not s_state:
                dst_opt.state.pop(dp, None)
                continue
            d_state = dst_opt.state[dp]
            for key, value in s_state.items():
                current = d_state.get(key)
                if torch.is_tensor(value):
                    if (torch.is_tensor(current) and current.shape == value.shape and current.dtype == value.dtype
                            and current.device == value.device):
                        current.copy_(value)
                    else:
                        d_state[key] = value.clone()
                else:
                    d_state[key] = copy.deepcopy(value)
            for key in [k for k in d_state if k not in s_state]:
                del d_state[key]
    for sg, dg in zip(src_opt.param_groups, dst_opt.param_groups):
        for key, value in sg.items():
            if key != "params":
                dg[key] = value.clone() if torch.is_tensor(value) else copy.deepcopy(value)


class Consensus:
    """The tensors the protocol moves: flat gradient buffers, the live optimizer and the consensus copy."""

    def __init__(self, opt, base, names):
        self.opt, self.base = opt, base
        self.all_params = [p for g in opt.param_groups for p in g["params"]]
        self.params = [p for p in self.all_params if p.requires_grad]
        self.names = [names.get(p, f"param[{i}]") for i, p in enumerate(self.params)]
        if not self.params:
            raise ValueError("hvd_backup: the optimizer has no parameters that require gradients")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"hvd_backup: all parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        if len(devices) != 1:
            raise ValueError(f"hvd_backup: all parameters must be on one device, got {sorted(map(str, devices))}")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.numel = sum(p.numel() for p in self.params)
        # Last element: the count of included contributions, reduced with the gradients.
        self.send = torch.zeros(self.numel + 1, dtype=self.dtype, device=self.device)
        self.zeros = torch.zeros_like(self.send)
        self._send_views = self.views(self.send)
        self.hyper = Hyper(opt.param_groups)
        self.shadow = None

    def views(self, flat):
        return flat_views(self.params, flat)

    def signature(self) -> str:
        return f"{self.dtype}:" + ",".join("x".join(map(str, p.shape)) for p in self.params)

    def flatten(self) -> None:
        """Copy the local gradients into ``send`` (training thread)."""
        views, grads = [], []
        with torch.no_grad():
            for p, view, name in zip(self.params, self._send_views, self.names):
                if p.grad is None:
                    view.zero_()
                elif p.grad.is_sparse:
                    raise ValueError(f"hvd_backup: parameter {name} has a sparse gradient; only dense ones are supported")
                elif p.grad.data_ptr() != view.data_ptr():  # a gradient accumulated in place already is there
                    views.append(view)
                    grads.append(p.grad)
            if views:
                torch._foreach_copy_(views, grads)

    def _apply(self, opt, params, flat, hyper) -> None:
        # The gradients become views of the reduced buffer: no copy. (For the live parameters that buffer is
        # then the training thread's `send`, which this thread does not touch until the next submission.)
        for p, view in zip(params, self.views(flat)):
            p.grad = view
        self.hyper.apply(opt.param_groups, hyper)
        self.base.step(opt)

    def live_params(self):
        return self.all_params

    def consensus_params(self):
        return [p for g in self.shadow.param_groups for p in g["params"]]

    def apply_live(self, flat, hyper) -> None:
        if flat is not self.send:  # the result is in `zeros`: it becomes the training thread's buffer
            self.send, self.zeros = self.zeros, self.send
            self._send_views = self.views(self.send)
        self._apply(self.opt, self.params, flat, hyper)

    def apply_consensus(self, flat, hyper) -> None:
        shadow_params = [p for g in self.shadow.param_groups for p in g["params"] if p.requires_grad]
        self._apply(self.shadow, shadow_params, flat, hyper)

    def _shadow_pairs(self):
        return list(zip(self.all_params, (p for g in self.shadow.param_groups for p in g["params"])))

    def sync_consensus(self) -> None:
        """Consensus := live (the live parameters are at the current step)."""
        if self.shadow is None:
            self.shadow = self._make_shadow()
        else:
            copy_state(self.opt, self.shadow, self._shadow_pairs())

    def restore_live(self) -> None:
        """Live := consensus (catch-up)."""
        copy_state(self.shadow, self.opt, [(s, p) for p, s in self._shadow_pairs()])

    def _make_shadow(self):
        base = self.base
        clones = {p: p.detach().clone().requires_grad_(p.requires_grad) for p in self.all_params}
        shadow = base.__new__(base)
        shadow.__dict__.update({k: v for k, v in self.opt.__dict__.items() if not k.startswith("_hvdb_")})
        shadow.param_groups = [dict(g, params=[clones[p] for p in g["params"]]) for g in self.opt.param_groups]
        shadow.state = defaultdict(dict)
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
            if hasattr(shadow, name):
                setattr(shadow, name, OrderedDict())
        copy_state(self.opt, shadow, list(clones.items()))
        return shadow
