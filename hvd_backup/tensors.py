"""The tensor side of the protocol (:class:`hvd_backup.protocol.TensorSide`): the flat gradient buffers, the
wrapped optimizer's live state, and the consensus copy that a rank whose training thread is behind keeps
current; plus the optimizer's hyper-parameters as a flat list of floats that travels with each step."""

from __future__ import annotations

import copy
import io
import numbers
from collections import defaultdict

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
        """Set the groups' values; a tensor is filled in place, an integer stays one only if the value is whole
        (``lr=1`` then 0.5 is 0.5, ``max_iter=20`` stays 20)."""
        for (gi, key, i), value in zip(self.fields, values):
            group = groups[gi]
            old = group[key] if i is None else group[key][i]
            if isinstance(old, torch.Tensor):
                old.fill_(value)
                continue
            new = int(value) if isinstance(old, numbers.Integral) and float(value).is_integer() else value
            if i is None:
                group[key] = new
            else:
                items = list(group[key])
                items[i] = new
                group[key] = tuple(items)


def copy_state(src_opt, dst_opt, pairs, *, groups: bool = True) -> None:
    """Make ``dst_opt``'s parameters and state (and, with ``groups``, its groups' settings) equal to
    ``src_opt``'s; ``pairs`` maps src to dst params."""
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
    if not groups:
        return
    for sg, dg in zip(src_opt.param_groups, dst_opt.param_groups):
        for key, value in sg.items():
            if key != "params":
                dg[key] = value.clone() if torch.is_tensor(value) else copy.deepcopy(value)


class Consensus:
    """The tensors the protocol moves (:class:`hvd_backup.protocol.TensorSide`): the flat gradient buffers, the
    live optimizer, and the consensus copy.

    The layout holds every parameter that requires a gradient when wrapped, and the frozen ones of the same
    dtype and device, so ``requires_grad`` may change later: a parameter for which no included rank had a
    gradient gets none, and the update skips it, as plain torch does.
    """

    def __init__(self, opt, base, names, *, sparse_as_dense: bool = False):
        self.opt, self.base = opt, base
        self.sparse_as_dense = sparse_as_dense
        self.all_params = [p for g in opt.param_groups for p in g["params"]]
        trained = [p for p in self.all_params if p.requires_grad]
        if not trained:
            raise ValueError("hvd_backup: the optimizer has no parameters that require gradients")
        dtypes = {p.dtype for p in trained}
        devices = {p.device for p in trained}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"hvd_backup: all parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        if len(devices) != 1:
            raise ValueError(f"hvd_backup: all parameters must be on one device, got {sorted(map(str, devices))}")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.params = [p for p in self.all_params if p.dtype == self.dtype and p.device == self.device]
        self._in_layout = {id(p) for p in self.params}
        self.names = [names.get(p, f"param[{i}]") for i, p in enumerate(self.params)]
        self.numel = sum(p.numel() for p in self.params)
        self.send = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.zeros = torch.zeros_like(self.send)
        self.present = torch.zeros(len(self.params), dtype=torch.float64)  # per parameter: this rank has a grad
        self.order = list(range(len(self.params)))  # the parameters' order in `send` (see arrange())
        self._send_views = self.views(self.send)
        self.hyper = Hyper(opt.param_groups)
        self.shadow = None

    def reserve(self, extra: int) -> None:
        """Give ``send`` and ``zeros`` ``extra`` elements after the gradients (the communication thread's, for the
        metadata that travels with the last bucket). Before the first hand-in."""
        self.send = torch.zeros(self.numel + extra, dtype=self.dtype, device=self.device)
        self.zeros = torch.zeros_like(self.send)
        self._send_views = self.views(self.send)

    def arrange(self, groups: list[range]) -> list[tuple[int, int]]:
        """Lay the gradients out in ``send`` bucket after bucket, each group of ``params`` indices in turn (the
        buckets' posting order, so that each bucket is one range and the last one ends where the metadata
        starts); return each bucket's element range. Before the first hand-in."""
        order = [i for group in groups for i in group]
        if sorted(order) != list(range(len(self.params))):
            raise ValueError(f"hvd_backup: a layout must name each of the {len(self.params)} parameters once")
        self.order = order
        self._send_views = self.views(self.send)
        ranges, at = [], 0
        for group in groups:
            n = sum(self.params[i].numel() for i in group)
            ranges.append((at, at + n))
            at += n
        return ranges

    def views(self, flat):
        """Views of ``flat`` shaped like each of ``params``, laid out in ``order``."""
        out, offset = [None] * len(self.params), 0
        for i in self.order:
            n = self.params[i].numel()
            out[i] = flat[offset:offset + n].view_as(self.params[i])
            offset += n
        return out

    def signature(self) -> str:
        return f"{self.dtype}:" + ",".join("x".join(map(str, p.shape)) for p in self.params)

    def check_unchanged(self) -> None:
        """Raise ``ValueError`` if the optimizer's parameters are no longer the wrapped ones (``add_param_group``
        after wrapping), or one outside the layout now requires a gradient."""
        now = [p for g in self.opt.param_groups for p in g["params"]]
        if len(now) != len(self.all_params) or any(a is not b for a, b in zip(now, self.all_params)):
            raise ValueError("hvd_backup: the optimizer's parameters changed after DistributedOptimizer(...) "
                             "(add_param_group?): add every parameter group before wrapping, or close() this "
                             "optimizer and wrap the new one")
        for p in now:
            if p.requires_grad and id(p) not in self._in_layout:
                raise ValueError(f"hvd_backup: a {p.dtype} parameter on {p.device} now requires a gradient, but "
                                 f"the optimizer reduces {self.dtype} on {self.device}: wrap it in its own optimizer")

    def _dense(self, i: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Parameter ``i``'s gradient as the dense tensor that travels (``None``: it has none, and ``present``
        says so)."""
        self.present[i] = 0.0 if grad is None else 1.0
        if grad is not None and grad.is_sparse:
            if not self.sparse_as_dense:
                raise ValueError(f"hvd_backup: parameter {self.names[i]} has a sparse gradient: pass "
                                 "sparse_as_dense=True to reduce it as a dense one")
            grad = grad.to_dense()
        return grad

    def flatten(self, inv_scale: torch.Tensor | None = None) -> None:
        """Copy the local gradients into ``send`` and note which parameters have one (training thread);
        ``inv_scale`` unscales them (a GradScaler's 1 / scale)."""
        views, grads = [], []
        with torch.no_grad():
            for i, (p, view) in enumerate(zip(self.params, self._send_views)):
                grad = self._dense(i, p.grad)
                if grad is None:
                    view.zero_()
                    continue
                if grad.data_ptr() != view.data_ptr():  # a gradient accumulated in place already is there
                    views.append(view)
                    grads.append(grad)
            if views:
                torch._foreach_copy_(views, grads)
            if inv_scale is not None:
                self.send[:self.numel].mul_(inv_scale.to(self.send.device))

    def take_grad(self, i: int, grad: torch.Tensor | None, times: torch.Tensor | None = None) -> bool:
        """Copy parameter ``i``'s gradient into ``send`` (``overlap``: from its hook during the backward pass),
        times ``times`` if given, and note whether it has one (training thread). Returns whether the gradient
        already lived there (accumulated in place into the buffer)."""
        view = self._send_views[i]
        with torch.no_grad():
            grad = self._dense(i, grad)
            if grad is None:
                view.zero_()
                return False
            in_place = grad.data_ptr() == view.data_ptr()
            if not in_place:
                view.copy_(grad)
            if times is not None:
                view.mul_(times.to(view.device))
            return in_place

    def _apply(self, opt, params, flat, hyper, present, skip: bool) -> None:
        # The gradients become views of the reduced buffer: no copy. (For the live parameters that buffer is
        # then the training thread's `send`, which this thread does not touch until the next submission.)
        for p, view, has in zip(params, self.views(flat), present.tolist()):
            p.grad = view if has else None
        if skip:
            return
        self.hyper.apply(opt.param_groups, hyper)
        self.base.step(opt)

    def live_params(self):
        return self.all_params

    def consensus_params(self):
        return [p for g in self.shadow.param_groups for p in g["params"]]

    def apply_live(self, flat, hyper, present, *, skip: bool = False) -> None:
        if flat.data_ptr() != self.send.data_ptr():  # the result is in `zeros`: the training thread's buffer now
            self.send, self.zeros = self.zeros, self.send
            self._send_views = self.views(self.send)
        self._apply(self.opt, self.params, flat, hyper, present, skip)

    def apply_consensus(self, flat, hyper, present, *, skip: bool = False) -> None:
        shadow = {id(p): s for p, s in self._shadow_pairs()}
        self._apply(self.shadow, [shadow[id(p)] for p in self.params], flat, hyper, present, skip)

    def _shadow_pairs(self):
        return list(zip(self.all_params, (p for g in self.shadow.param_groups for p in g["params"])))

    def sync_consensus(self) -> None:
        """Consensus := live (the live parameters are at the current step)."""
        if self.shadow is None:
            self.shadow = self._make_shadow()
        else:
            copy_state(self.opt, self.shadow, self._shadow_pairs())

    def restore_live(self) -> None:
        """Live := consensus (catch-up): parameters and optimizer state. The groups' settings stay this rank's
        own, where its learning-rate schedule keeps them (each step applies the first arriver's anyway)."""
        copy_state(self.shadow, self.opt, [(s, p) for p, s in self._shadow_pairs()], groups=False)

    def export_state(self, live: bool) -> bytes:
        """The parameters and optimizer state, live or the consensus copy's, as bytes (``torch.save``)."""
        opt = self.opt if live else self.shadow
        params = self.all_params if live else self.consensus_params()
        payload = {"params": [p.detach() for p in params], "state": [dict(opt.state.get(p, {})) for p in params]}
        out = io.BytesIO()
        torch.save(payload, out)
        return out.getvalue()

    def import_state(self, data: bytes) -> None:
        """Consensus := the parameters and optimizer state another rank's :meth:`export_state` wrote."""
        payload = torch.load(io.BytesIO(data), map_location=self.device, weights_only=False)
        if self.shadow is None:
            self.shadow = self._make_shadow()
        params = self.consensus_params()
        if len(payload["params"]) != len(params):
            raise ValueError(f"hvd_backup: a state of {len(payload['params'])} parameters for {len(params)}")
        with torch.no_grad():
            for p, value, state in zip(params, payload["params"], payload["state"]):
                p.copy_(value)
                if state:
                    self.shadow.state[p] = state
                else:
                    self.shadow.state.pop(p, None)

    def _make_shadow(self):
        base = self.base
        clones = {p: p.detach().clone().requires_grad_(p.requires_grad) for p in self.all_params}
        shadow = base.__new__(base)
        shadow.__dict__.update({k: v for k, v in self.opt.__dict__.items() if not k.startswith("_hvdb_")})
        shadow.param_groups = [dict(g, params=[clones[p] for p in g["params"]]) for g in self.opt.param_groups]
        shadow.state = defaultdict(dict)
        # The same step hooks as the live optimizer (they get the optimizer they run for: clipping, clamping,
        # EMA apply to whichever copy is being updated).
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
            if hasattr(self.opt, name):
                setattr(shadow, name, getattr(self.opt, name))
        copy_state(self.opt, shadow, list(clones.items()))
        return shadow
