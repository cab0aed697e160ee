"""``hvd-backup-plan``: choose b for N ranks, from a measured trace or a named delay distribution.

    hvd-backup-plan --trace logs/run.jsonl --ranks 8,64,1024,10000 --params 25.6M --bandwidth 12.5GB/s
    hvd-backup-plan --compute 0.25 --straggler 'lognormal:median=0.02,sigma=1' --ranks 64,1024 --batch 64

For every N and candidate b it simulates the protocol (:mod:`hvd_backup.planning.simulate`) with per-rank
work drawn from the trace's measured compute times (or from ``--compute`` plus the ``--straggler`` spec),
adds the per-step communication (a ring or tree allreduce of the model: bandwidth and latency terms), the
counter's serialized atomics, and the fixed per-step cost measured in the trace (with ``--overlap``, only the
allreduce time the backward pass does not hide: :func:`exposed_seconds`), and prints the expected step
time, throughput (samples/s) and effective batch for each b, recommending the b with the highest throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import numpy as np

from .simulate import simulate

__all__ = ["Workload", "allreduce_seconds", "choose_b", "exposed_seconds", "predict", "main"]


def _number(text: str, units: dict[str, float], what: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+(?:e-?\d+)?)\s*([A-Za-z/]*)\s*", text)
    if not m or m.group(2) not in units:
        raise ValueError(f"{what} {text!r}: expected a number with one of {', '.join(u or '(none)' for u in units)}")
    return float(m.group(1)) * units[m.group(2)]


def parse_count(text: str) -> float:
    return _number(text, {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}, "--params")


def parse_bandwidth(text: str) -> float:
    """Bytes per second."""
    return _number(text, {"B/s": 1, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "Gbit/s": 1.25e8, "Gb/s": 1.25e8},
                   "--bandwidth")


def parse_seconds(text: str) -> float:
    return _number(text, {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}, "a time")


def allreduce_seconds(n: int, nbytes: float, bandwidth: float, latency: float, algorithm: str = "ring") -> float:
    """Time of one allreduce of ``nbytes`` over ``n`` ranks: the bandwidth term plus the latency term."""
    if n <= 1:
        return 0.0
    if algorithm == "ring":
        return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency
    if algorithm == "tree":
        return 2 * nbytes / bandwidth + 2 * math.ceil(math.log2(n)) * latency
    raise ValueError(f"--algorithm {algorithm!r}: ring or tree")


def exposed_seconds(comm_s: float, backward_s: float, tail_s: float) -> float:
    """With ``overlap=True``: the part of a step's allreduce time ``comm_s`` that the backward pass (``backward_s``)
    does not hide, and never less than ``tail_s``, the last bucket's allreduce (the first layers' gradients, ready
    only when the backward pass ends)."""
    return max(comm_s - backward_s, tail_s, 0.0)


class Workload:
    """Seconds of work per (step, rank): drawn from measured samples or from compute + a straggler spec."""

    def __init__(self, *, samples: list[np.ndarray] | None = None, compute: float | None = None,
                 straggler: str | None = None):
        self.samples, self.compute, self.straggler = samples, compute, straggler

    @classmethod
    def from_trace(cls, path: str) -> tuple["Workload", dict]:
        """Per-rank compute times and the fixed per-step cost from a trainer metrics file (--metrics)."""
        from ..train.metrics import of_type, read_metrics

        steps = of_type(read_metrics(path), "step")
        if not steps or "compute_s" not in steps[0] or not steps[0]["compute_s"]:
            raise ValueError(f"--trace {path}: no per-rank compute times (record it with --mode backup --metrics)")
        n = steps[0]["size"]
        per_rank = [np.array([s["compute_s"][r] for s in steps if s["compute_s"][r] is not None]) for r in range(n)]
        overheads = []
        for s in steps:
            arrived = sorted(c for c in s["compute_s"] if c is not None)
            if len(arrived) >= s["count"] > 0:
                overheads.append(s["step_s"] - arrived[s["count"] - 1])
        info = {"ranks": n, "steps": len(steps), "overhead_s": float(np.median(overheads)) if overheads else 0.0,
                "mean_step_s": float(np.mean([s["step_s"] for s in steps])), "count": steps[-1]["count"]}
        return cls(samples=per_rank), info

    def median(self) -> float:
        """The median seconds of work per step (without injected delays)."""
        if self.samples is not None:
            return float(np.median(np.concatenate(self.samples)))
        return float(self.compute)

    def table(self, n: int, steps: int, rng: np.random.Generator, per_rank: bool = False) -> np.ndarray:
        if self.samples is not None:
            if per_rank and len(self.samples) == n:
                return np.stack([rng.choice(s, size=steps) for s in self.samples], axis=1)
            pooled = np.concatenate(self.samples)
            return rng.choice(pooled, size=(steps, n))
        from mpi_tools.straggler import StragglerInjector

        injector = StragglerInjector(self.straggler, rank=0, size=n)
        return self.compute + injector.draw(steps, self.compute, rng)


def predict(workload: Workload, n: int, b: int, *, steps: int, comm_s: float, seed: int = 0,
            per_rank: bool = False) -> float:
    """Mean seconds per step for ``n`` ranks with ``b`` backup workers."""
    table = workload.table(n, steps + 1, np.random.default_rng(seed), per_rank=per_rank)
    result = simulate(n, b, steps, lambda r, v: float(table[min(v, steps), r]), comm_s=comm_s)
    return result["time"] / steps


def candidates(n: int) -> list[int]:
    """0, 1, 2, 3, then about 1%, 2%, 5%, 10%, 20% of n (each below n)."""
    out = {b for b in (0, 1, 2, 3) if b < n}
    out |= {max(1, round(f * n)) for f in (0.01, 0.02, 0.05, 0.1, 0.2) if round(f * n) < n}
    return sorted(out)


def choose_b(workload: Workload, n: int, *, batch: int, steps: int, comm_s: float, seed: int = 0,
             per_rank: bool = False, bs: list[int] | None = None) -> tuple[int, list[dict]]:
    """The b with the highest throughput, and every candidate's prediction."""
    rows = []
    for b in bs if bs is not None else candidates(n):
        t = predict(workload, n, b, steps=steps, comm_s=comm_s, seed=seed, per_rank=per_rank)
        rows.append({"b": b, "k": n - b, "step_s": t, "samples_per_s": (n - b) * batch / t,
                     "effective_batch": (n - b) * batch})
    best = max(rows, key=lambda r: r["samples_per_s"])
    return best["b"], rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hvd-backup-plan", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="a metrics file of hvd-backup-train --mode backup --metrics FILE")
    source.add_argument("--compute", type=parse_seconds, help="seconds of compute per step per rank (with --straggler)")
    parser.add_argument("--straggler", default="none", help="delay distribution, as hvd-backup-train --straggler")
    parser.add_argument("--ranks", default="4,8,64,1024,10000", help="comma-separated N to plan for")
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--params", type=parse_count, default=None, help="model parameters, e.g. 25.6M")
    parser.add_argument("--bytes-per-param", type=int, default=4)
    parser.add_argument("--bandwidth", type=parse_bandwidth, default=parse_bandwidth("12.5GB/s"),
                        help="allreduce bus bandwidth per rank, e.g. 12.5GB/s or 100Gbit/s")
    parser.add_argument("--latency", type=parse_seconds, default=parse_seconds("5us"), help="per message, e.g. 5us")
    parser.add_argument("--algorithm", choices=("ring", "tree"), default="ring")
    parser.add_argument("--atomic", type=parse_seconds, default=parse_seconds("2us"),
                        help="one fetch-and-op at the counter's host (arrivals are serialized there)")
    parser.add_argument("--overhead", type=parse_seconds, default=None,
                        help="fixed seconds per step besides the allreduce (default: measured from --trace, else 0)")
    parser.add_argument("--overlap", action="store_true",
                        help="the optimizer's overlap=True: the allreduce runs during the backward pass")
    parser.add_argument("--backward-fraction", type=float, default=2 / 3,
                        help="with --overlap: the share of a step's compute that is the backward pass")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0,
                        help="with --overlap: the optimizer's bucket_cap_mb (the last bucket cannot overlap)")
    parser.add_argument("--steps", type=int, default=200, help="simulated steps per prediction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the predictions here")
    args = parser.parse_args(argv)
    try:
        ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
        if not ranks or min(ranks) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--ranks {args.ranks!r}: comma-separated positive integers")
    try:
        if args.trace:
            workload, info = Workload.from_trace(args.trace)
            overhead = info["overhead_s"] if args.overhead is None else args.overhead
            print(f"trace {args.trace}: {info['ranks']} ranks, {info['steps']} steps, mean step "
                  f"{1e3 * info['mean_step_s']:.1f} ms, fixed cost per step {1e3 * overhead:.1f} ms (measured)")
        else:
            workload = Workload(compute=args.compute, straggler=args.straggler)
            overhead = args.overhead or 0.0
            from mpi_tools.straggler import parse_spec

            parse_spec(args.straggler)
    except (OSError, ValueError) as exc:
        print(f"hvd-backup-plan: error: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.backward_fraction <= 1:
        parser.error(f"--backward-fraction {args.backward_fraction}: between 0 and 1")
    nbytes = (args.params or 0) * args.bytes_per_param
    out = []
    for n in ranks:
        comm = allreduce_seconds(n, nbytes, args.bandwidth, args.latency, args.algorithm)
        if args.overlap:
            tail = allreduce_seconds(n, min(nbytes, args.bucket_cap_mb * 2**20), args.bandwidth, args.latency,
                                     args.algorithm)
            comm = exposed_seconds(comm, args.backward_fraction * workload.median(), tail)
        steps = args.steps if n <= 1000 else max(20, args.steps // 10)
        same_n = args.trace is not None and n == info["ranks"]
        best, rows = choose_b(workload, n, batch=args.batch, steps=steps, seed=args.seed, per_rank=same_n,
                              comm_s=overhead + comm + n * args.atomic)
        base = rows[0]
        hidden = ", not hidden by backward" if args.overlap else ""
        print(f"\nN={n}: allreduce {1e3 * comm:.2f} ms ({args.algorithm}{hidden}), "
              f"counter {1e3 * n * args.atomic:.2f} ms,"
              f" fixed {1e3 * overhead:.2f} ms per step")
        print(f"{'b':>6s}{'k=N-b':>7s}{'step ms':>10s}{'samples/s':>12s}{'eff. batch':>12s}{'vs b=0':>8s}")
        for r in rows:
            mark = "  <- recommended" if r["b"] == best else ""
            print(f"{r['b']:6d}{r['k']:7d}{1e3 * r['step_s']:10.1f}{r['samples_per_s']:12.0f}{r['effective_batch']:12d}"
                  f"{r['samples_per_s'] / base['samples_per_s']:8.2f}{mark}")
        out.append({"ranks": n, "comm_s": comm, "recommended_b": best, "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
