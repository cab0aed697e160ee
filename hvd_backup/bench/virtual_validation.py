"""The virtual cluster against real runs: the same job as real ``hvd-backup-train`` jobs on N ranks (N = 4, 8)
and on N virtual workers, for sync, backup workers and async, with the same seeds, delays, data and
hyper-parameters; final accuracy, time to the accuracy target, total training time and (backup) the included
sets side by side.

    python -m hvd_backup.bench.virtual_validation --out docs/results/virtual_validation.json \\
        --traces docs/results/virtual-traces [--ranks 4,8] [--seeds 3] [--reuse]
    python -m hvd_backup.bench.virtual_validation --out docs/results/virtual_validation.json --traces - --table

The real ranks share this machine's cores with each other and with whatever else runs, so their compute is
slower than one rank's alone and changes with the load. Each virtual run therefore takes its compute times from
its own real run's metrics (:func:`~hvd_backup.planning.virtual.trace_compute`: the injected delays
taken out, and drawn again step by step), and a backup run's fixed cost per step as the planner measures it.
Real times leave out the evaluations (the virtual clock does not count them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from ..planning.simulate import simulate
from ..planning.virtual import Network, WorkTimes, run, trace_compute
from ..train.config import parse_args
from ..train.metrics import of_type, read_metrics, summary_of
from .accuracy import MODES, STRAGGLER, TASKS, train_run

TARGET = 0.95  # digits, as in the accuracy experiment


def real_curve(records: list[dict]) -> dict:
    """Evaluations of a real run on its training clock: each evaluation's own duration (from the record before
    it to its own) taken out of it and of everything after."""
    spent, last, evals = 0.0, 0.0, []
    for r in records:
        if r["type"] == "eval":
            spent += r["time"] - last
            evals.append({"step": r["step"], "time": r["time"] - spent, "top1": r["top1"]})
        if "time" in r:
            last = r["time"]
    summary = summary_of(records)
    staleness = [r["staleness"] for r in of_type(records, "step") if "staleness" in r]
    reached = next((e["time"] for e in evals if e["top1"] >= TARGET), None)
    return {"evals": evals, "final_top1": summary["final_top1"], "time_s": evals[-1]["time"],
            "time_to_target_s": reached, "wall_s": summary["wall_s"],
            "mean_staleness": float(np.mean(staleness)) if staleness else None}


def same_included(records: list[dict], work: WorkTimes, b: int, comm_s: float) -> float:
    """The fraction of a real backup run's steps whose included set the virtual clock, replaying that run's
    compute times and delays, picks the same."""
    real = [sorted(r["included"]) for r in of_type(records, "step")]
    virtual = simulate(work.n, b, len(real), work, comm_s)["included"]
    return float(np.mean([a == v for a, v in zip(real, virtual)]))


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table: per N and mode, means over seeds of real and virtual final top-1,
    training seconds and seconds to the target, and the range over seeds of virtual / real."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else None

    def ratios(group, key):
        rs = [r["virtual"][key] / r["real"][key] for r in group
              if r["virtual"][key] is not None and r["real"][key] is not None]
        return f"{min(rs):.2f}–{max(rs):.2f}" if rs else "–"

    def cell(x, fmt):
        return "–" if x is None else format(x, fmt)

    out = ["| N | mode | seeds | final top-1 real / virtual | training s real / virtual (ratio range) "
           "| s to target real / virtual (ratio range) | same included |", "|" + " --- |" * 7]
    for key in dict.fromkeys((r["ranks"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["ranks"], r["mode"]) == key]
        reached = [sum(r[side]["time_to_target_s"] is not None for r in group) for side in ("real", "virtual")]
        same = mean([r.get("same_included") for r in group])
        real, virtual = ({k: mean([r[side][k] for r in group]) for k in ("final_top1", "time_s", "time_to_target_s")}
                         for side in ("real", "virtual"))
        missed = "" if reached[0] == reached[1] == len(group) else f"; reached {reached[0]} / {reached[1]}"
        out.append(
            f"| {key[0]} | {key[1]} | {len(group)} | {real['final_top1']:.3f} / {virtual['final_top1']:.3f} "
            f"| {real['time_s']:.1f} / {virtual['time_s']:.1f} ({ratios(group, 'time_s')}) "
            f"| {cell(real['time_to_target_s'], '.1f')} / {cell(virtual['time_to_target_s'], '.1f')} "
            f"({ratios(group, 'time_to_target_s')}{missed}) | {cell(same, '.2f')} |")
    return "\n".join(out)


def _flags(mode: str) -> list[str]:
    return TASKS["digits"][0] + MODES[mode]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--traces", required=True, help="where the real runs' metrics files go (kept)")
    parser.add_argument("--ranks", default="4,8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", default="sync,backup b=1,backup b=2,async")
    parser.add_argument("--reuse", action="store_true", help="reuse metrics files already in --traces")
    parser.add_argument("--table", action="store_true", help="only print the table of a finished --out")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.out) as f:
            print(markdown_table(json.load(f)["rows"]))
        return 0
    import torch

    torch.set_num_threads(1)
    os.makedirs(args.traces, exist_ok=True)
    eval_every = TASKS["digits"][1]
    modes = [m.strip() for m in args.modes.split(",")]
    rows = []
    for n in [int(x) for x in args.ranks.split(",")]:
        for seed in range(args.seeds):
            for mode in modes:
                kind = mode.split()[0]
                b = int(mode.split("=")[1]) if kind == "backup" else 0
                every = eval_every * (n if kind == "async" else 1)  # async counts one rank's update as a step
                path = os.path.join(args.traces, f"n{n}-{mode.replace(' ', '').replace('=', '')}-s{seed}.jsonl")
                if not (args.reuse and os.path.exists(path)):
                    if os.path.exists(path):
                        os.remove(path)  # the trainer appends
                    train_run(n, _flags(mode), seed, every, path, f"virtual_validation: N={n} {mode}")
                records = read_metrics(path)
                real = real_curve(records)
                table, info = trace_compute(path, straggler=STRAGGLER, seed=seed)
                per_row = n if kind == "async" else 1

                def work():
                    return WorkTimes(n, table=table, per_row=per_row, straggler=STRAGGLER, seed=seed)

                cfg = dataclasses.replace(parse_args(_flags(mode)), seed=seed, straggler=STRAGGLER, eval_every=every)
                network = Network(overhead_s=info["overhead_s"], bandwidth=None)
                virtual = run(cfg, n, work(), network, target=TARGET)
                row = {"ranks": n, "mode": mode, "seed": seed, "backup_workers": b, "fixed_cost_s": info["overhead_s"],
                       "compute_median_s": float(np.nanmedian(table)), "real": real,
                       "virtual": {k: virtual.get(k) for k in ("evals", "final_top1", "time_s", "time_to_target_s",
                                                                "mean_staleness", "wall_s")}}
                if kind == "backup":
                    row["same_included"] = same_included(records, work(), b, info["overhead_s"])
                rows.append(row)
                v = row["virtual"]
                print(f"N={n} {mode:12s} seed {seed}: real top1 {real['final_top1']:.4f} time {real['time_s']:6.2f}s "
                      f"target {real['time_to_target_s']}  | virtual top1 {v['final_top1']:.4f} "
                      f"time {v['time_s']:6.2f}s target {v['time_to_target_s']}"
                      + (f"  same included {row['same_included']:.2f}" if kind == "backup" else ""), flush=True)
                with open(args.out, "w") as f:  # after every row: a long validation is usable while it runs
                    json.dump({"straggler": STRAGGLER, "target": TARGET, "rows": rows}, f, indent=1)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
