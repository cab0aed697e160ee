"""``backup_workers="auto"``: re-choose b every few steps from the records every rank holds.

Every rank runs the same decision on the same data (per-rank compute times and step times that travelled in
the steps' reduced records) with the same seed, so all ranks switch to the same b at the same step without
any extra communication. The rule: the b in ``[b_min, b_max]`` with the highest expected throughput
``(N - b) / T(b)``, where ``T(b)`` is the expected (N-b)-th fastest compute time, drawn from each rank's recent
compute times, plus the fixed per-step cost measured in the same records.
"""

from __future__ import annotations

import collections

import numpy as np

__all__ = ["AutoBackup"]


class AutoBackup:
    def __init__(self, size: int, *, every: int, b_min: int, b_max: int, window: int | None = None,
                 rounds: int = 256):
        self.size, self.every, self.b_min, self.b_max = size, every, b_min, b_max
        self.window = window or 2 * every
        self.rounds = rounds
        # The steps it decides from, its own copy: users pop the engine's records whenever they like, at
        # different times on different ranks, and a choice made from those would differ across ranks.
        self.seen: collections.deque = collections.deque(maxlen=self.window)

    def observe(self, record) -> int | None:
        """Add a completed step; every ``every`` steps, the b for the next ones (``None``: keep the current one).
        Every rank observes the same records and seeds with the step: every rank gets the same b."""
        self.seen.append(record)
        if (record.step + 1) % self.every:
            return None
        return self.decide(self.seen, seed=record.step)

    def decide(self, records, seed: int) -> int | None:
        """The b for the next steps, or ``None`` to keep the current one (too little data)."""
        records = list(records)[-self.window:]
        n = self.size
        samples = [[r.compute_s[q] for r in records if q < len(r.compute_s) and r.compute_s[q] is not None]
                   for q in range(n)]
        if sum(map(bool, samples)) < n - self.b_max:
            return None
        fixed = []
        for r in records:
            known = sorted(c for c in r.compute_s if c is not None)
            if r.rank_step_s and len(known) >= r.count > 0:
                fixed.append(float(np.median(r.rank_step_s)) - known[r.count - 1])
        overhead = max(0.0, float(np.median(fixed))) if fixed else 0.0
        rng = np.random.default_rng(seed)
        draws = np.stack([rng.choice(s, self.rounds) if s else np.full(self.rounds, np.inf) for s in samples], axis=1)
        draws.sort(axis=1)  # draws[:, k - 1]: the k-th fastest rank in each round
        best, best_rate = None, -1.0
        for b in range(self.b_min, self.b_max + 1):
            t = float(np.mean(draws[:, n - b - 1])) + overhead
            rate = (n - b) / t if np.isfinite(t) and t > 0 else 0.0
            if rate > best_rate * 1.0001:  # ties go to the smaller b (more gradients per step)
                best, best_rate = b, rate
        return best
