"""Helpers for the multi-rank tests: a small model, per-rank data, the global-step loop, digests, and the
record of what each rank handed in that the reference (:mod:`tests.mpi.reference`) replays."""

import copy
import hashlib
import io
import pickle

import pytest
import torch

from mpi_tools import StragglerInjector

from .reference import HandedIn, Mismatch, RankLog, check_final, exact, replay


def need_ranks(comm, n):
    if comm.Get_size() < n:
        pytest.skip(f"needs at least {n} ranks")


def make_model(seed=0, width=16):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))


def batch(step, rank, n=16):
    """Deterministic data for (step, rank): every rank has its own shard."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def rank_lr(rank: int, calls: int) -> float:
    """A learning rate that differs between ranks and changes with every step() call (like a per-iteration
    scheduler, which runs ahead on ranks that skip steps): only the first arriver's may be applied."""
    return 0.02 * (1 + rank / 4) * (1 + (calls % 5) / 10)


def train_until(opt, model, steps, injector: StragglerInjector | None = None, barrier=None, popped=None,
                recorder=None, lr=None):
    """The loop users write: run until the *global* step reaches ``steps``; return this rank's records. With a
    list ``popped``, pop the step records into it after every step, as the trainer does; with a
    :class:`Recorder`, record what is handed in; with ``lr(rank, calls)``, set the learning rate first."""
    mine = []
    loss_fn = torch.nn.CrossEntropyLoss()
    while opt.global_step < steps:
        if barrier is not None:
            barrier()
        version = opt.global_step
        if injector is not None:
            injector.sleep(version)
        x, y = batch(version, opt.rank)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr(opt.rank, len(mine))
        if recorder is not None:
            recorder.hand_in(model)
        opt.step()
        mine.append((version, opt.last_step))
        if popped is not None:
            popped += opt.pop_records()
    return mine


class Recorder:
    """What this rank hands in, for the reference: each gradient (made exact) with the parameters and
    hyper-parameters it was computed with, and the counter value each arrival of this rank read (taken by
    wrapping the arrival counter's ``arrive``, where the protocol itself learns it)."""

    def __init__(self, opt, model):
        self.opt, self.model = opt, model
        self.handed_in: list[HandedIn] = []
        self.arrivals: dict[int, int] = {}
        counter = opt._hvdb_engine.counter
        arrive = counter.arrive

        def arrive_and_note(step):
            value = arrive(step)
            self.arrivals[step] = value
            return value

        counter.arrive = arrive_and_note
        # Exact already as backward() produces them: with overlap=True they leave before hand_in() runs.
        for p in model.parameters():
            p.register_hook(exact)

    def hand_in(self, model) -> None:
        """Between ``backward()`` and ``step()``: round the gradients to exact values and note them."""
        params = list(model.parameters())
        with torch.no_grad():
            for p in params:
                p.grad.copy_(exact(p.grad))
        hyper = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self.handed_in.append(HandedIn(self.opt.global_step, [p.detach().clone() for p in params],
                                       [p.grad.detach().clone() for p in params], hyper))

    def log(self) -> RankLog:
        params = list(self.model.parameters())
        state = [{k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
                  for k, v in self.opt.state.get(p, {}).items()} for p in params]
        return RankLog(self.opt.rank, self.handed_in, dict(self.arrivals), self.opt.global_step,
                       [p.detach().clone() for p in params], state)


def assert_matches_reference(comm, recorder: Recorder, records, initial, make_optimizer) -> None:
    """Collective: rank 0 replays ``records`` (every step from 0) in the reference from the parameters
    ``initial`` with ``make_optimizer(params)`` and checks every rank's hand-ins and final state against it;
    a difference fails the test on every rank."""
    logs = comm.gather(_dumps(recorder.log()), root=0)
    verdict = None
    if comm.Get_rank() == 0:
        logs = [pickle.loads(log) for log in logs]
        try:
            params, states = replay(initial, make_optimizer, records, logs)
            check_final(logs, params, states, len(records))
        except Mismatch as exc:
            verdict = str(exc)
    verdict = comm.bcast(verdict, root=0)
    if verdict is not None:
        pytest.fail(f"the run differs from the reference: {verdict}", pytrace=False)


class _TensorsAsArrays(pickle.Pickler):
    # torch pickles each tensor through torch.save, about a millisecond apiece: thousands of hand-ins took
    # seconds. As numpy arrays they cost microseconds and come back with the same dtype and bits.
    def reducer_override(self, obj):
        if torch.is_tensor(obj):
            return torch.from_numpy, (obj.detach().cpu().numpy().copy(),)
        return NotImplemented


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _TensorsAsArrays(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _bytes(tensor) -> bytes:
    # Through uint8, so that dtypes numpy lacks (bfloat16) hash too.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def state_digest(model, opt) -> str:
    """A hash of every parameter and optimizer-state tensor (bit-exact comparison across ranks)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(_bytes(p))
    for p in model.parameters():
        for key, value in sorted(opt.state.get(p, {}).items()):
            if torch.is_tensor(value):
                h.update(key.encode())
                h.update(_bytes(value))
    return h.hexdigest()


def assert_same_everywhere(comm, value, what):
    everyone = comm.allgather(value)
    assert all(v == everyone[0] for v in everyone), f"{what} differs across ranks: {everyone}"
