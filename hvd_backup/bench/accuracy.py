"""Time to accuracy: plain sync, backup workers (b = 1, 2) and async SGD, on digits and on a harder synthetic
image task, several seeds, each a real ``hvd-backup-train`` job with the same injected heavy-tailed delays.

    python -m hvd_backup.bench.accuracy --out accuracy.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from mpi_tools.launch import run

from ..train.metrics import of_type, read_metrics, summary_of

NP = 4
STRAGGLER = "lognormal:median=0.02,sigma=1"
TASKS = {
    "digits": (["--dataset", "digits", "--epochs", "15"], 15),
    # Harder: a faint class signal under unit noise (hvd_backup.train.data.SyntheticImages), 3 channels of 8 x 8.
    "synthetic": (["--dataset", "synthetic", "--image-size", "8", "--num-classes", "10", "--synthetic-size", "4096",
                   "--arch", "digits_cnn", "-b", "32", "--epochs", "10", "--lr", "0.2"], 32),
}
MODES = {
    "sync": ["--mode", "sync"],
    "backup b=1": ["--mode", "backup", "--backup-workers", "1"],
    "backup b=2": ["--mode", "backup", "--backup-workers", "2"],
    "async": ["--mode", "async"],
}


def train_run(np_: int, flags: list[str], seed: int, eval_every: int, metrics: str, what: str) -> None:
    """One real ``hvd-backup-train`` job on ``np_`` ranks with the experiments' straggler and evaluation
    settings, its metrics into ``metrics``; exits with ``what`` and the job's output if it fails."""
    cmd = [sys.executable, "-m", "hvd_backup.train", *flags, "--seed", str(seed), "--straggler", STRAGGLER,
           "--eval-every", str(eval_every), "--print-freq", "100000", "--metrics", metrics, "--progress", "lines"]
    proc = run(np_, cmd, timeout=900, capture=True)
    if proc.returncode != 0:
        print(proc.stdout, file=sys.stderr)
        raise SystemExit(f"{what} seed {seed} failed ({proc.returncode})")


def curve(path: str) -> dict:
    records = read_metrics(path)
    evals = of_type(records, "eval")
    summary = summary_of(records)
    staleness = [r["staleness"] for r in of_type(records, "step") if "staleness" in r]
    return {"step": [e["step"] for e in evals], "time": [e["time"] for e in evals], "top1": [e["top1"] for e in evals],
            "final_top1": summary["final_top1"], "wall_s": summary["wall_s"], "steps": summary["steps"],
            "mean_staleness": sum(staleness) / len(staleness) if staleness else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one seed, digits only")
    args = parser.parse_args(argv)
    tasks = {"digits": TASKS["digits"]} if args.quick else TASKS
    seeds = 1 if args.quick else args.seeds
    result = {"ranks": NP, "straggler": STRAGGLER, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="hvd_backup-accuracy-") as tmp:
        for task, (flags, eval_every) in tasks.items():
            result["tasks"][task] = {}
            for mode, mode_flags in MODES.items():
                runs = []
                for seed in range(seeds):
                    metrics = os.path.join(tmp, f"{task}-{mode}-{seed}.jsonl".replace(" ", "_").replace("=", ""))
                    every = eval_every * (NP if mode == "async" else 1)  # async counts one rank's update as a step
                    train_run(NP, [*flags, *mode_flags], seed, every, metrics, f"accuracy: {task} {mode}")
                    runs.append(curve(metrics))
                    print(f"{task:16s} {mode:12s} seed {seed}: top1 {runs[-1]['final_top1']:.4f} in "
                          f"{runs[-1]['wall_s']:.1f}s", flush=True)
                result["tasks"][task][mode] = runs
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
