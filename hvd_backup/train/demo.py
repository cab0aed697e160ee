"""`make demo`: 4 ranks on digits with one slow rank, trained with backup workers (b=1) and with plain
synchronous SGD, then the comparison a user wants to see.

    python -m hvd_backup.train.demo [--np 4] [--delay 0.15] [--slow-rank 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from mpi_tools.launch import run

from .metrics import of_type, read_metrics, summary_of


def _summary(path: str) -> dict:
    records = read_metrics(path)
    summary = dict(summary_of(records))
    steps = of_type(records, "step")
    summary["median_step_s"] = sorted(r["step_s"] for r in steps)[len(steps) // 2] if steps else float("nan")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvd_backup.train.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--np", type=int, default=4, help="ranks")
    parser.add_argument("--delay", type=float, default=0.15, help="seconds the slow rank sleeps every step")
    parser.add_argument("--slow-rank", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    straggler = f"fixed:delay={args.delay},rank={args.slow_rank}"
    results = {}
    with tempfile.TemporaryDirectory(prefix="hvd_backup-demo-") as tmp:
        for mode, extra in (("backup", ["--mode", "backup", "--backup-workers", "1"]), ("sync", ["--mode", "sync"])):
            metrics = os.path.join(tmp, f"{mode}.jsonl")
            title = "backup workers, b=1" if mode == "backup" else "plain synchronous SGD (hvd.DistributedOptimizer)"
            print(f"\n=== {args.np} ranks on digits, rank {args.slow_rank} sleeps {args.delay}s per step: {title}",
                  flush=True)
            cmd = [sys.executable, "-m", "hvd_backup.train", *extra, "--straggler", straggler, "--print-freq", "10",
                   "--metrics", metrics, "--progress", "lines"]
            code = run(args.np, cmd, timeout=args.timeout).returncode
            if code != 0:
                print(f"demo: the {mode} run failed with exit code {code}", file=sys.stderr)
                return code or 1
            results[mode] = _summary(metrics)
    b, s = results["backup"], results["sync"]
    print("\n=== what backup workers bought")
    print(f"{'':28s}{'backup (b=1)':>16s}{'sync':>16s}")
    print(f"{'median time per step (ms)':28s}{b['median_step_s'] * 1e3:16.1f}{s['median_step_s'] * 1e3:16.1f}")
    print(f"{'training wall time (s)':28s}{b['wall_s']:16.1f}{s['wall_s']:16.1f}")
    print(f"{'final test accuracy (top-1)':28s}{b['final_top1']:16.4f}{s['final_top1']:16.4f}")
    steps = b["steps"]
    dropped = ", ".join(f"rank {r}: {n}/{steps}" for r, n in enumerate(b["dropped_counts"]))
    print(f"steps each rank was dropped from (backup): {dropped}")
    print(f"speed-up per step: {s['median_step_s'] / b['median_step_s']:.1f}x; wall time: "
          f"{s['wall_s'] / b['wall_s']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
