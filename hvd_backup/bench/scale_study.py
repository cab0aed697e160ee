"""The paper's comparison at the scale it was made: sync, backup workers and async SGD for N = 16 to 128 virtual
workers (:mod:`hvd_backup.planning.virtual`), on digits and on a CIFAR-10-sized synthetic task, with
heavy-tailed delays on every worker and with one persistently slow worker.

    python -m hvd_backup.bench.scale_study --out docs/results/scale.json [--resume] [--quick] [--only digits,...]
    python -m hvd_backup.bench.scale_study --figures docs/results/scale.json   # the plots, from the JSON

Parts (``--only``), in this order: ``digits`` and ``synthetic`` (every N, heavy-tailed delays; sync, b of about
5% and 10% of N, auto, async), ``one-slow`` (both tasks, one slow worker; sync, b of about 5%, auto, async),
``b-sweep`` (digits, N = 64: more values of b), ``network`` (digits with a ResNet-50-sized model on the wire:
what communication costs each mode) and ``clocks`` (the time of a whole run per mode from the clocks alone,
N = 8 to 128, with either model on the wire: no training, seconds). Results are written after every run;
``--resume`` keeps the runs already in ``--out`` and does the others. Every mode trains the same epochs with the
trainer's learning-rate rule (the rate scales with the samples per update: (N - b) x batch for sync and backup,
one batch for async). Each worker computes for ``COMPUTE`` seconds per gradient plus its delays; the network is
the planner's default (12.5 GB/s, 5 us, ring allreduce, 2 us counter atomics). One core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import numpy as np

from ..planning.simulate import simulate
from ..planning.virtual import AsyncSchedule, Network, VirtualJob, WorkTimes
from ..train.config import parse_args

COMPUTE = 0.02  # seconds of compute per gradient, as long as the median delay below
DELAYS = {
    "heavy-tailed": "lognormal:median=0.02,sigma=1",
    # One worker persistently 10x slower; a little jitter on everyone so that the others do not tie.
    "one-slow": "exp:mean=0.002+slow:factor=10,rank=0",
}
TASKS = {
    # 1,437 training images: at N = 128 each worker's shard is 12 images, one batch of 8 per epoch.
    "digits": dict(flags=["--dataset", "digits", "--lr", "0.05"], train=1437, batch=8, epochs=100, target=0.95),
    # CIFAR-10's size in samples, classes and channels (50,000 training images, 10 classes, 3 channels) at 8 x 8
    # pixels: a faint class signal under unit noise (hvd_backup.train.data.SyntheticImages), the small CNN.
    "synthetic": dict(flags=["--dataset", "synthetic", "--image-size", "8", "--num-classes", "10",
                             "--synthetic-size", "50000", "--arch", "digits_cnn", "--lr", "0.05", "--warmup-steps",
                             "10"], train=50000, batch=8, epochs=3, target=0.30),
}
RANKS = (16, 32, 64, 128)
EVALS = 20  # evaluations per run


def backups(n: int) -> list[tuple[str, int | str]]:
    """b of about 5% and 10% of N (at least 1 and 2), and auto."""
    return [("b~5%", max(1, round(0.05 * n))), ("b~10%", max(2, round(0.1 * n))), ("auto", "auto")]


def _steps(task: dict, n: int) -> int:
    return (math.ceil(task["train"] / n) // task["batch"]) * task["epochs"]


def _job(task: dict, n: int, mode: str, b, spec: str, network: Network, seed: int = 0) -> VirtualJob:
    every = max(1, _steps(task, n) // EVALS) * (n if mode == "async" else 1)
    cfg = parse_args(task["flags"] + ["-b", str(task["batch"]), "--epochs", str(task["epochs"]), "--mode", mode,
                                      "--backup-workers", str(b), "--straggler", spec, "--eval-every", str(every),
                                      "--seed", str(seed)])
    work = WorkTimes(n, compute=COMPUTE, straggler=spec, seed=seed)
    return VirtualJob(cfg, n, work, network, target=task["target"])


class Study:
    """The runs so far: printed as they finish and written out after each, so a long study's results are usable
    while it runs. A sync run's training does not depend on delays or the network (every step waits for everyone):
    under other ones only its clock is run again (:meth:`sync`)."""

    def __init__(self, path: str, meta: dict, *, resume: bool = False):
        self.path, self.meta, self.runs, self.earlier_s = path, meta, [], 0.0
        if resume and os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            self.runs, self.earlier_s = done["runs"], done.get("seconds", 0.0)
            self.meta.update({k: v for k, v in done.items() if k not in self.meta and k not in ("runs", "seconds")})
        self._sync: dict[tuple, tuple[dict, dict]] = {}
        self.started = time.monotonic()

    def done(self, tags: dict, n: int, label: str) -> bool:
        return any(r["part"] == tags["part"] and r["delay"] == tags["delay"] and r["ranks"] == n
                   and r["label"] == label for r in self.runs)

    def add(self, result: dict, **tags) -> None:
        result.update(tags)
        self.runs.append(result)
        b = f"b={result['backup_workers']}" if result["mode"] == "backup" else ""
        reached = "-" if result["time_to_target_s"] is None else f"{result['time_to_target_s']:.1f}"
        extra = (f"staleness {result['mean_staleness']:6.1f}" if result["mode"] == "async"
                 else f"dropped {sum(result['dropped_per_rank'])}")
        print(f"{result['part']:9s} {result['delay']:12s} N={result['ranks']:<4d} {result['mode']:6s} {b:7s} "
              f"top1 {result['final_top1']:.4f}  time {result['time_s']:8.1f}s  to target {reached:>7s}s  {extra}  "
              f"({result['wall_s']:.0f}s)", flush=True)
        self.save()

    def save(self) -> None:
        with open(self.path, "w") as f:
            json.dump(dict(self.meta, seconds=self.earlier_s + time.monotonic() - self.started, runs=self.runs), f)

    def sync(self, task_name: str, task: dict, n: int, spec: str, network: Network) -> dict:
        key = (task_name, task["epochs"], n)
        if key not in self._sync:
            job = _job(task, n, "sync", 0, spec, network)
            trained = next((r for r in self.runs if r["task"] == task_name and r["mode"] == "sync" and r["ranks"] == n
                            and r["steps"] == job.trainer.total and r["wall_s"] > 0), None)
            result = trained or job.run()
            self._sync[key] = (result, dict(total=job.trainer.total, seed=job.cfg.seed, nbytes=job.nbytes))
            if trained is None:
                return result
        result, job = self._sync[key]
        # The same training on the clock of the other delays and network.
        comm_s = network.step_s(n, network.model_bytes or job["nbytes"], counter=False)
        work = WorkTimes(n, compute=COMPUTE, straggler=spec, seed=job["seed"])
        times = np.concatenate([[0.0], np.cumsum(simulate(n, 0, job["total"], work, comm_s)["step_times"])])
        evals = [dict(e, time=float(times[e["step"]])) for e in result["evals"]]
        reached = next((e["time"] for e in evals if e["top1"] >= task["target"]), None)
        return dict(result, straggler=spec, evals=evals, time_s=float(times[-1]), time_to_target_s=reached,
                    mean_step_s=float(times[-1]) / job["total"], comm_s=comm_s, wall_s=0.0)


def compare(study: Study, task_name: str, ranks, delay: str, *, task: dict | None = None,
            network: Network | None = None, part: str | None = None, choose_b=backups,
            with_async: bool = True) -> None:
    """Sync, backup workers (``choose_b(n)``: labels and b) and async on one task and delay model, every N."""
    task, network, spec = task or TASKS[task_name], network or Network(), DELAYS[delay]
    tags = dict(part=part or task_name, task=task_name, delay=delay)
    for n in ranks:
        if not study.done(tags, n, "sync"):
            study.add(study.sync(task_name, task, n, spec, network), label="sync", **tags)
        for label, b in choose_b(n):
            if not study.done(tags, n, label):
                study.add(_job(task, n, "backup", b, spec, network).run(), label=label, **tags)
        if with_async and not study.done(tags, n, "async"):
            study.add(_job(task, n, "async", 0, spec, network).run(), label="async", **tags)


def clocks(study: Study, ranks=(8, 16, 32, 64, 128)) -> None:
    """Seconds of a whole digits run, heavy-tailed delays, for sync, b of about 10% of N and async, on the clocks
    alone (no training: a run's time does not depend on what it learns), with the study's model and with the big
    one on the wire: the N at which moving the model makes async fall behind."""
    spec, task, rows = DELAYS["heavy-tailed"], TASKS["digits"], []
    nbytes = _job(task, 8, "sync", 0, spec, Network()).nbytes
    for name, network in (("small", Network()), ("big", BIG_MODEL)):
        size = network.model_bytes or nbytes
        for n in ranks:
            steps, b = _steps(task, n), backups(n)[1][1]

            def work():
                return WorkTimes(n, compute=COMPUTE, straggler=spec)

            sync = simulate(n, 0, steps, work(), network.step_s(n, size, counter=False))
            backup = simulate(n, b, steps, work(), network.step_s(n, size, counter=True))
            schedule = AsyncSchedule(n, work(), move_s=network.transfer_s(size), update_s=network.update_s())
            rows.append(dict(model=name, ranks=n, steps=steps, b=b, sync_s=sync["time"], backup_s=backup["time"],
                             async_s=schedule.run(steps * n)))
            r = rows[-1]
            print(f"clocks    {name:5s} model  N={n:<4d} sync {r['sync_s']:7.1f}s  b={b:<3d} {r['backup_s']:7.1f}s  "
                  f"async {r['async_s']:7.1f}s", flush=True)
    study.meta["clocks"] = rows


PARTS = ("digits", "synthetic", "one-slow", "b-sweep", "network", "clocks")
# ResNet-50's 25.6M parameters on the wire (the compute stays the small CNN's): what moving a real model costs.
BIG_MODEL = Network(model_bytes=25.6e6 * 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results here (JSON)")
    parser.add_argument("--figures", metavar="JSON", help="only draw the figures of a finished study, beside it")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out; do the others")
    parser.add_argument("--ranks", default=None, help="only these N, comma-separated (default: every part's own)")
    parser.add_argument("--tasks", default="digits,synthetic", help="one-slow: of these tasks")
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes' version: digits, 10 epochs, N = 16 and 64, heavy-tailed delays")
    args = parser.parse_args(argv)
    if args.figures:
        figures(args.figures)
        return 0
    if not args.out:
        parser.error("--out is required")
    import torch

    torch.set_num_threads(1)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    study = Study(args.out, {"compute_s": COMPUTE, "delays": DELAYS, "tasks": TASKS,
                             "network": dataclasses.asdict(Network()),
                             "big_model_network": dataclasses.asdict(BIG_MODEL)}, resume=args.resume)
    wanted = None if args.ranks is None else {int(x) for x in args.ranks.split(",")}

    def only(ranks):
        return [n for n in ranks if wanted is None or n in wanted]

    if args.quick:
        quick(study)
    else:
        for name in ("digits", "synthetic"):
            if name in parts:
                compare(study, name, only(RANKS), "heavy-tailed")
        if "one-slow" in parts:  # any b >= 1 drops the slow worker: one b, and auto
            for name in args.tasks.split(","):
                compare(study, name, only(RANKS), "one-slow", choose_b=lambda n: [backups(n)[0], backups(n)[2]])
        if "b-sweep" in parts:  # digits, N = 64: more b beside the 3 and 6 above
            compare(study, "digits", only([64]), "heavy-tailed", part="b-sweep",
                    choose_b=lambda n: [(f"b={b}", b) for b in (1, 13, 32)], with_async=False)
        if "network" in parts:
            compare(study, "digits", only((16, 64, 128)), "heavy-tailed", network=BIG_MODEL, part="network",
                    choose_b=lambda n: [backups(n)[1]])
        if "clocks" in parts:
            clocks(study, only((8, 16, 32, 64, 128)))
            study.save()
    print(f"scale study: {len(study.runs)} runs in {time.monotonic() - study.started:.0f} s", flush=True)
    figures(args.out)
    return 0


def figures(path: str) -> None:
    """The study's figures, PNG beside its JSON: accuracy against time per part, and against N."""
    from . import plots

    with open(path) as f:
        runs = json.load(f)["runs"]
    stem = path[:-len(".json")] if path.endswith(".json") else path
    for part in dict.fromkeys(r["part"] for r in runs):
        plots.scale_curves(runs, f"{stem}_{part}.png", part)
    if any(r["part"] in ("digits", "synthetic") for r in runs):
        plots.scale_vs_n(runs, f"{stem}_vs_n.png")
    if any(r["part"] == "b-sweep" for r in runs):
        plots.b_sweep(runs, f"{stem}_b.png")


def quick(study: Study) -> None:
    """The ``make bench`` version (a few minutes): digits for 10 epochs, N = 16 and 64, heavy-tailed delays; sync,
    b = 10% of N and async."""
    compare(study, "digits", (16, 64), "heavy-tailed", task=dict(TASKS["digits"], epochs=10), part="quick",
            choose_b=lambda n: [backups(n)[1]])


if __name__ == "__main__":
    raise SystemExit(main())
