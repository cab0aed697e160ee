"""With overlap, who is in for which bucket: the hand-in at ``step()``, the decision at the first bucket (what
``overlap=True`` does) and the decision per bucket, in step time and accuracy, on the virtual cluster
(:mod:`hvd_backup.planning.virtual`, :class:`~hvd_backup.planning.simulate.BucketSchedule`).

    python -m hvd_backup.bench.inclusion --out docs/results/inclusion_digits.json --tasks digits
    python -m hvd_backup.bench.inclusion --table docs/results/inclusion_*.json     # the table, from the JSONs

The scale study's two tasks (:data:`~.scale_study.TASKS`: digits, and the CIFAR-10-sized synthetic task) on
N = 16 workers, sync and b = 2 (about 10%), each worker computing 20 ms per gradient plus its delays: heavy-tailed
ones on every worker, or one worker ten times slower; each delay placed before the forward pass (as the trainer
injects it), spread over the compute (a slower device), or as one pause at a random point of the backward pass.
ResNet-50's 25.6M parameters on the wire at 12.5 GB/s (a 15 ms allreduce at N = 16); the small CNN's gradient in
three buckets (``bucket_cap_mb=0.1`` and a 4 KB first bucket: with the default 25 MB it is one bucket, where the
rules coincide), the backward pass two thirds of the compute. One core; results are written after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from ..planning.simulate import Inclusion
from ..planning.virtual import Overlap, VirtualJob, WorkTimes
from ..train.config import parse_args
from .scale_study import BIG_MODEL, COMPUTE, DELAYS, EVALS, TASKS, _steps

N, B = 16, 2
CASES = (  # (delay model, where the delay falls)
    ("heavy-tailed", "start"), ("heavy-tailed", "spread"), ("heavy-tailed", "backward"), ("one-slow", "spread"))
LAYOUT = dict(bucket_cap_mb=0.1, first_bucket_mb=0.004, backward_fraction=0.67)


def run(task_name: str, delay: str, where: str, b: int, inclusion: Inclusion, seed: int, *,
        epochs: float | None = None) -> dict:
    """One run of the study: its summary, tagged."""
    task = TASKS[task_name]
    if epochs is not None:
        task = dict(task, epochs=epochs)
    spec = DELAYS[delay]
    cfg = parse_args(task["flags"] + ["-b", str(task["batch"]), "--epochs", str(task["epochs"]),
                                      "--mode", "sync" if b == 0 else "backup", "--backup-workers", str(b),
                                      "--straggler", spec, "--eval-every", str(max(1, int(_steps(task, N)) // EVALS)),
                                      "--seed", str(seed)])
    work = WorkTimes(N, compute=COMPUTE, straggler=spec, seed=seed)
    overlap = Overlap(inclusion, delay_at=where, **LAYOUT)
    result = VirtualJob(cfg, N, work, BIG_MODEL, target=task["target"], overlap=overlap).run()
    return dict(result, task=task_name, delay=delay, where=where)


def table(runs: list[dict]) -> list[str]:
    """A markdown table: per task, delay and mode, each rule's mean step (ms), final top-1 and seconds to the
    target (means over seeds; over those that reached it), and the share of steps whose buckets had different
    ranks (per bucket)."""
    rules = [i.value for i in Inclusion]
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in runs:
        key = (r["task"], r["delay"], r["where"], r["backup_workers"])
        cells.setdefault(key, {}).setdefault(r["overlap"]["inclusion"], []).append(r)
    head = ["task", "delays", "where", "b", "seeds"] + [f"{rule}: ms/step, top-1, s to target" for rule in rules] \
        + ["steps split by bucket"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    for key, by_rule in cells.items():
        row = [key[0], key[1], key[2], str(key[3]), str(min(len(v) for v in by_rule.values()))]
        for rule in rules:
            got = by_rule.get(rule, [])
            if not got:
                row.append("")
                continue
            times = [g["time_to_target_s"] for g in got if g["time_to_target_s"] is not None]
            reached = "–" if not times else f"{mean(times):.1f}" + (
                "" if len(times) == len(got) else f" ({len(times)} of {len(got)} reached)")
            row.append(f"{1e3 * mean([g['mean_step_s'] for g in got]):.1f}, {mean([g['final_top1'] for g in got]):.3f}, "
                       + reached)
        split = by_rule.get(Inclusion.BUCKET.value, [])
        row.append(f"{mean([g['per_bucket_steps'] / g['steps'] for g in split]):.0%}" if split else "")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvd_backup.bench.inclusion", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the runs here (JSON), after each")
    parser.add_argument("--tasks", default="digits,synthetic", help="comma-separated, of: " + ", ".join(TASKS))
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--epochs", type=float, default=None, help="instead of each task's own")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of finished runs")
    args = parser.parse_args(argv)
    if args.table:
        runs = []
        for path in args.table:
            with open(path) as f:
                runs += json.load(f)["runs"]
        print("\n".join(table(runs)))
        return 0
    tasks = [t for t in args.tasks.split(",") if t]
    if not args.out or any(t not in TASKS for t in tasks):
        parser.error(f"--out is required; --tasks {args.tasks!r}: of {', '.join(TASKS)}")
    import torch

    torch.set_num_threads(1)
    runs, tic = [], time.monotonic()
    for seed in (int(s) for s in args.seeds.split(",")):
        for task in tasks:
            for delay, where in CASES:
                for b in (0, B):
                    for inclusion in Inclusion:
                        r = run(task, delay, where, b, inclusion, seed, epochs=args.epochs)
                        runs.append(r)
                        print(f"{task:9s} {delay:12s} {where:8s} b={b} {inclusion.value:6s} seed {seed}  "
                              f"{1e3 * r['mean_step_s']:6.1f} ms/step  top1 {r['final_top1']:.4f}  to target "
                              f"{r['time_to_target_s'] if r['time_to_target_s'] is None else round(r['time_to_target_s'], 2)}"
                              f"  split {r['per_bucket_steps']}/{r['steps']}  ({r['wall_s']:.0f}s)", flush=True)
                        with open(args.out + ".tmp", "w") as f:
                            json.dump({"argv": sys.argv[1:] if argv is None else list(argv), "n": N, "b": B,
                                       "compute_s": COMPUTE, "layout": LAYOUT,
                                       "network": dataclasses.asdict(BIG_MODEL), "cases": CASES,
                                       "seconds": time.monotonic() - tic, "runs": runs}, f)
                        os.replace(args.out + ".tmp", args.out)
    print("\n".join(table(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
