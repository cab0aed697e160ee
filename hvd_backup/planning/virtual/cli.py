"""``python -m hvd_backup.planning.virtual``: train jobs on N virtual workers, for several N, modes and b.

    python -m hvd_backup.planning.virtual --dataset digits -b 8 --epochs 100 --ranks 16,32,64,128 \\
        --modes sync,backup,async --backups 5%,10%,auto --compute 20ms \\
        --straggler 'lognormal:median=0.02,sigma=1' --target 0.95 --out vc.json

The training flags (``--dataset``, ``-b``, ``--epochs``, ``--lr``, ``--seed``, ``--straggler``, ...) are
``hvd-backup-train``'s; ``--eval-every`` counts synchronous steps (async evaluates every N times as many
updates, the same points in data seen). Communication: for sync and backup a fixed cost per step
(``--overhead``), an allreduce of the model (ring or tree: bandwidth and latency terms) and, with backup
workers, the counter's N serialized atomics (the planner's terms); for async every update's push and pull of the
whole model through the links of the one rank that holds the parameters, plus ``--update-overhead``.

``--inclusion step,first,bucket`` runs sync and backup with the gradient in buckets (``overlap=True``'s layout,
``--bucket-cap-mb``, ``--first-bucket-mb``), one allreduce per bucket on the link, and each inclusion rule:
``step`` (the hand-in at ``step()``), ``first`` (overlap, decided at the first bucket: what the optimizer does)
and ``bucket`` (overlap, the first N - b ranks with a bucket ready are in for it); ``--delay-at`` says where a
worker's delay falls in its step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from ...errors import UserError
from ...train.config import parse_args
from ..plan import parse_bandwidth, parse_count, parse_seconds
from ..simulate import Inclusion
from .job import Overlap, run
from .network import Network
from .work import DELAY_AT, WorkTimes, trace_compute

__all__ = ["main", "parse_backups"]


def parse_backups(text: str, n: int) -> list:
    """``1,5%,auto`` for N ranks: integers, percentages of N (at least 1), or auto."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        if item == "auto":
            out.append("auto")
        elif item.endswith("%"):
            out.append(max(1, round(float(item[:-1]) / 100 * n)))
        else:
            out.append(int(item))
    return list(dict.fromkeys(out))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hvd_backup.planning.virtual", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Every other flag is hvd-backup-train's (see its --help).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--compute", type=parse_seconds, help="seconds of compute per gradient, e.g. 20ms")
    source.add_argument("--trace", help="a metrics file of hvd-backup-train --metrics FILE: compute times, replayed "
                                        "step by step when it has N ranks, else drawn")
    parser.add_argument("--trace-straggler", default=None,
                        help="the --straggler the trace was recorded with (and its --seed): its delays are taken out")
    parser.add_argument("--ranks", default="16,32,64,128", help="comma-separated N")
    parser.add_argument("--modes", default="sync,backup,async", help="comma-separated: sync, backup, async")
    parser.add_argument("--backups", default="1",
                        help="b for --modes backup, comma-separated: integers, percentages of N, auto")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
    parser.add_argument("--target", type=float, default=None, help="test top-1 to report the time to")
    parser.add_argument("--overhead", type=parse_seconds, default=None,
                        help="fixed seconds per synchronous step besides the allreduce (default: the trace's, else 0)")
    parser.add_argument("--update-overhead", type=parse_seconds, default=0.0,
                        help="async: fixed seconds per update besides moving the model")
    parser.add_argument("--bandwidth", type=parse_bandwidth, default=parse_bandwidth("12.5GB/s"))
    parser.add_argument("--latency", type=parse_seconds, default=parse_seconds("5us"))
    parser.add_argument("--algorithm", choices=("ring", "tree"), default="ring")
    parser.add_argument("--atomic", type=parse_seconds, default=parse_seconds("2us"))
    parser.add_argument("--params", type=parse_count, default=None,
                        help="parameters on the wire, 4 bytes each (default: the model's own), e.g. 25.6M")
    parser.add_argument("--no-network", action="store_true", help="no bandwidth or latency terms, only fixed costs")
    parser.add_argument("--inclusion", default=None,
                        help="comma-separated: step, first, bucket: the gradient in buckets, with each of these "
                             "inclusion rules (default: one whole gradient, the planner's clock)")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="with --inclusion: the optimizer's")
    parser.add_argument("--first-bucket-mb", type=float, default=1.0, help="with --inclusion: the first bucket's")
    parser.add_argument("--backward-fraction", type=float, default=0.67,
                        help="with --inclusion: the share of a gradient's compute that is the backward pass")
    parser.add_argument("--delay-at", choices=DELAY_AT, default="start",
                        help="with --inclusion: where a worker's delay falls: before the forward pass (the "
                             "trainer's), spread over the compute, or one pause at a random point of the backward")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="write the results here (JSON)")
    return parser


def row(r: dict) -> str:
    """One run as one line."""
    b = f"b={r['backup_workers']}" if r["mode"] == "backup" else ""
    if "overlap" in r:
        b += f" {r['overlap']['inclusion']}"
    reached = "-" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.2f}"
    extra = f"staleness {r['mean_staleness']:.1f}" if r["mode"] == "async" else f"dropped {sum(r['dropped_per_rank'])}"
    return (f"N={r['ranks']:<5d}{r['mode']:7s}{b:15s}seed {r['seed']}  top1 {r['final_top1']:.4f}  "
            f"time {r['time_s']:8.2f}s  to target {reached:>7s}s  {extra}  ({r['wall_s']:.0f}s)")


def main(argv=None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        base = parse_args(rest)
        ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in ("sync", "backup", "async")]
        if bad or not modes or not ranks or min(ranks) < 1:
            raise UserError(f"--modes {args.modes!r} / --ranks {args.ranks!r}: modes from sync, backup, async; "
                            "ranks positive integers")
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [base.seed]
        overlaps: list[Overlap | None] = [None]
        if args.inclusion is not None:
            try:
                rules = [Inclusion(x.strip()) for x in args.inclusion.split(",") if x.strip()]
            except ValueError:
                rules = []
            if not rules or args.bucket_cap_mb <= 0 or args.first_bucket_mb <= 0 \
                    or not 0 <= args.backward_fraction <= 1:
                raise UserError(f"--inclusion {args.inclusion!r} --bucket-cap-mb {args.bucket_cap_mb} "
                                f"--first-bucket-mb {args.first_bucket_mb} --backward-fraction "
                                f"{args.backward_fraction}: rules from {', '.join(i.value for i in Inclusion)}; "
                                "bucket sizes > 0; a fraction between 0 and 1")
            overlaps = [Overlap(rule, args.bucket_cap_mb, args.first_bucket_mb, args.backward_fraction,
                                args.delay_at) for rule in rules]
        table, overhead = None, args.overhead or 0.0
        if args.trace:
            table, info = trace_compute(args.trace, straggler=args.trace_straggler, seed=base.seed)
            overhead = info["overhead_s"] if args.overhead is None else args.overhead
    except (UserError, ValueError, OSError) as exc:
        print(f"virtual: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    network = Network(overhead_s=overhead, update_overhead_s=args.update_overhead,
                      bandwidth=None if args.no_network else args.bandwidth, latency_s=args.latency,
                      algorithm=args.algorithm, atomic_s=args.atomic,
                      model_bytes=None if args.params is None else 4 * args.params)
    results = []
    for n in ranks:
        jobs = []
        for mode in modes:
            if mode == "backup":
                jobs += [dict(mode="backup", backup_workers=b) for b in parse_backups(args.backups, n)]
            else:
                jobs.append(dict(mode=mode, backup_workers=0))
        jobs = [(job, overlap) for job in jobs for overlap in (overlaps if job["mode"] != "async" else [None])]
        for seed in seeds:
            for job, overlap in jobs:
                every = base.eval_every * (n if job["mode"] == "async" else 1)
                cfg = dataclasses.replace(base, seed=seed, eval_every=every, **job)
                work = WorkTimes(n, compute=args.compute or 0.0, table=table, straggler=cfg.straggler, seed=seed,
                                 per_row=n if job["mode"] == "async" else 1)
                try:
                    result = run(cfg, n, work, network, target=args.target, overlap=overlap)
                except (UserError, ValueError) as exc:
                    print(f"virtual: N={n} {job}: {exc}", file=sys.stderr)
                    return 2
                print(row(result), flush=True)
                results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else list(argv), "network": dataclasses.asdict(network),
                       "runs": results}, f, indent=1)
    return 0
