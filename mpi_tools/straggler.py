"""Seeded straggler injection, driven by one spec string shared by tests, the trainer and the benchmarks.

A spec is one or more terms joined by ``+``; each term is ``KIND[:key=value,...]``::

    none                               no delay
    fixed:delay=2.0,rank=3             rank 3 sleeps 2 s every step
    exp:mean=0.05                      every rank sleeps Exp(mean 50 ms) each step
    lognormal:median=0.02,sigma=1.0    every rank sleeps LogNormal(median 20 ms, sigma 1) each step
    tail:p=0.1,delay=0.5               each step, each rank sleeps 0.5 s with probability 0.1
    slow:factor=10,rank=2              rank 2 is persistently 10x slower: it sleeps 9x its own compute time

``rank=`` selects ranks: ``*`` (all, the default), one rank ``3``, a range ``0-3``, or a list ``1/3/5``. The
delays of several terms add up. Draws depend only on ``(seed, term, rank, step)``, so every rank and every
re-run sees the same delays, and :meth:`StragglerInjector.table` gives all ranks' delays for simulations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["StragglerInjector", "Term", "parse_spec"]

_KINDS = {
    "none": (),
    "fixed": ("delay",),
    "exp": ("mean",),
    "lognormal": ("median", "sigma"),
    "tail": ("p", "delay"),
    "slow": ("factor",),
}


@dataclass(frozen=True)
class Term:
    kind: str
    params: tuple[tuple[str, float], ...]
    ranks: tuple[int, ...] | None  # None: all ranks

    def param(self, name: str) -> float:
        return dict(self.params)[name]

    def applies_to(self, rank: int) -> bool:
        return self.ranks is None or rank in self.ranks


def _parse_ranks(text: str, spec: str) -> tuple[int, ...] | None:
    if text == "*":
        return None
    ranks: list[int] = []
    try:
        for part in text.split("/"):
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                ranks.extend(range(lo, hi + 1))
            else:
                ranks.append(int(part))
    except ValueError:
        raise ValueError(
            f"straggler spec {spec!r}: rank={text!r} is not '*', a rank, a range 'a-b' or a list 'a/b/c'"
        ) from None
    if any(r < 0 for r in ranks):
        raise ValueError(f"straggler spec {spec!r}: rank={text!r} names a negative rank")
    return tuple(sorted(set(ranks)))


def parse_spec(spec: str | None) -> tuple[Term, ...]:
    """Parse a straggler spec (see the module docstring); raise ``ValueError`` naming what is wrong."""
    if spec is None or spec.strip() in ("", "none"):
        return ()
    terms = []
    for raw in spec.split("+"):
        raw = raw.strip()
        kind, _, rest = raw.partition(":")
        if kind not in _KINDS:
            raise ValueError(
                f"straggler spec {spec!r}: unknown kind {kind!r}; allowed: {', '.join(_KINDS)}"
            )
        if kind == "none":
            continue
        values: dict[str, float] = {}
        ranks = None
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError(f"straggler spec {spec!r}: {item!r} is not key=value")
            if key == "rank":
                ranks = _parse_ranks(value.strip(), spec)
                continue
            if key not in _KINDS[kind]:
                raise ValueError(
                    f"straggler spec {spec!r}: {kind} takes {', '.join(_KINDS[kind] + ('rank',))}, not {key!r}"
                )
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"straggler spec {spec!r}: {key}={value!r} is not a number") from None
            if not math.isfinite(number) or number < 0:
                raise ValueError(f"straggler spec {spec!r}: {key}={value!r} must be a finite number >= 0")
            values[key] = number
        missing = [k for k in _KINDS[kind] if k not in values]
        if missing:
            raise ValueError(f"straggler spec {spec!r}: {kind} needs {', '.join(missing)}")
        if kind == "tail" and values["p"] > 1:
            raise ValueError(f"straggler spec {spec!r}: p={values['p']} is a probability, must be <= 1")
        if kind == "slow" and values["factor"] < 1:
            raise ValueError(f"straggler spec {spec!r}: factor={values['factor']} must be >= 1")
        terms.append(Term(kind, tuple(sorted(values.items())), ranks))
    return tuple(terms)


class StragglerInjector:
    """Delays for one rank, step by step, from a spec; deterministic in ``(seed, term, rank, step)``."""

    def __init__(self, spec: str | None, *, rank: int, size: int, seed: int = 0):
        self.spec = spec or "none"
        self.terms = parse_spec(spec)
        self.rank = rank
        self.size = size
        self.seed = int(seed)
        for term in self.terms:
            if term.ranks is not None and max(term.ranks) >= size:
                raise ValueError(
                    f"straggler spec {self.spec!r} names rank {max(term.ranks)}, but there are only {size} ranks"
                )

    @property
    def active(self) -> bool:
        return any(term.applies_to(self.rank) for term in self.terms)

    def _draw(self, index: int, term: Term, rank: int, step: int, compute_s: float) -> float:
        if not term.applies_to(rank):
            return 0.0
        if term.kind == "fixed":
            return term.param("delay")
        if term.kind == "slow":
            return (term.param("factor") - 1.0) * compute_s
        rng = np.random.default_rng([self.seed, index, rank, step])
        if term.kind == "exp":
            return float(rng.exponential(term.param("mean")))
        if term.kind == "lognormal":
            return float(term.param("median") * math.exp(term.param("sigma") * rng.standard_normal()))
        if term.kind == "tail":
            return term.param("delay") if rng.random() < term.param("p") else 0.0
        raise AssertionError(term.kind)

    def delay(self, step: int, compute_s: float = 0.0, *, rank: int | None = None) -> float:
        """Seconds of delay for ``rank`` (default: this rank) at ``step``; ``compute_s`` feeds ``slow`` terms."""
        rank = self.rank if rank is None else rank
        return sum(self._draw(i, t, rank, step, compute_s) for i, t in enumerate(self.terms))

    def sleep(self, step: int, compute_s: float = 0.0) -> float:
        """Sleep for this rank's delay at ``step``; return it."""
        seconds = self.delay(step, compute_s)
        if seconds > 0:
            time.sleep(seconds)
        return seconds

    def table(self, steps: int, compute_s: float = 0.0) -> np.ndarray:
        """Delays of every rank for steps ``0..steps-1``, shape ``(steps, size)``."""
        return np.array(
            [[self.delay(s, compute_s, rank=r) for r in range(self.size)] for s in range(steps)], dtype=float
        )

    def draw(self, steps: int, compute_s: float, rng: np.random.Generator) -> np.ndarray:
        """Delays of every rank for ``steps`` steps, shape ``(steps, size)``, drawn from ``rng`` in one go: the
        same distributions as :meth:`delay`, for planning at any size (not the per-(rank, step) stream)."""
        out = np.zeros((steps, self.size))
        for term in self.terms:
            cols = list(range(self.size)) if term.ranks is None else [r for r in term.ranks if r < self.size]
            shape = (steps, len(cols))
            if term.kind == "fixed":
                add = np.full(shape, term.param("delay"))
            elif term.kind == "slow":
                add = np.full(shape, (term.param("factor") - 1.0) * compute_s)
            elif term.kind == "exp":
                add = rng.exponential(term.param("mean"), shape)
            elif term.kind == "lognormal":
                add = term.param("median") * np.exp(term.param("sigma") * rng.standard_normal(shape))
            else:  # tail
                add = np.where(rng.random(shape) < term.param("p"), term.param("delay"), 0.0)
            out[:, cols] += add
        return out

    def __repr__(self) -> str:
        return f"StragglerInjector({self.spec!r}, rank={self.rank}, size={self.size}, seed={self.seed})"
