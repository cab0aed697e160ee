"""Summarise trainer metrics files side by side: step time, throughput, who was dropped, final accuracy.

    python -m hvd_backup.bench.summarize logs/bench-123/*.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from ..train.metrics import of_type, read_metrics, summary_of


def summarize(path: str) -> dict:
    records = read_metrics(path)
    steps = of_type(records, "step")
    summary = summary_of(records)
    times = sorted(r["step_s"] for r in steps[len(steps) // 10:])  # skip the warm-up tenth
    return {
        "run": os.path.splitext(os.path.basename(path))[0],
        "steps": len(steps),
        "median_step_s": statistics.median(times) if times else float("nan"),
        "mean_step_s": statistics.fmean(times) if times else float("nan"),
        "included": statistics.fmean(r["count"] for r in steps) if steps else float("nan"),
        "size": steps[0]["size"] if steps else 0,
        "top1": summary.get("final_top1"),
        "wall_s": summary.get("wall_s"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="metrics files (--metrics) of hvd-backup-train")
    parser.add_argument("--batch-size", type=int, default=None, help="per-rank batch, for samples per second")
    args = parser.parse_args(argv)
    rows = [summarize(p) for p in args.files]
    print(f"{'run':24s}{'steps':>7s}{'median ms':>11s}{'mean ms':>9s}{'in/N':>9s}{'top1':>8s}{'wall s':>8s}")
    for r in rows:
        top1 = "-" if r["top1"] is None else f"{r['top1']:.4f}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        print(f"{r['run']:24s}{r['steps']:7d}{1e3 * r['median_step_s']:11.1f}{1e3 * r['mean_step_s']:9.1f}"
              f"{r['included']:6.1f}/{r['size']:<2d}{top1:>8s}{wall:>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
