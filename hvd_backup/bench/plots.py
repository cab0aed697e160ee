"""The figures of docs/RESULTS.md, from the benchmark's JSON (matplotlib, no display needed)."""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def step_time(result: dict, path: str) -> None:
    """Measured and ideal ms per step against b, one panel per straggler model; Horovod as a line."""
    plt = _plt()
    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, (name, row) in zip(axes[0], models.items()):
        bs = sorted(int(k[1:]) for k in row["ideal_ms"])
        ax.plot(bs, [row["measured_ms"][f"b{b}"] for b in bs], "o-", label="hvd_backup (measured)")
        ax.plot(bs, [row["ideal_ms"][f"b{b}"] for b in bs], "s--", label="ideal (zero overhead)")
        ax.axhline(row["measured_ms"]["horovod"], color="grey", ls=":", label="hvd.DistributedOptimizer")
        if "auto_steady" in row["measured_ms"]:
            ax.axhline(row["measured_ms"]["auto_steady"], color="tab:green", ls="-.", label="b = auto (steady)")
        ax.set_title(f"{name}\n{row['spec']}", fontsize=9)
        ax.set_xlabel("backup workers b")
        ax.set_xticks(bs)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("ms per step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Step time against b, {result['ranks']} ranks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy(result: dict, path: str) -> None:
    """Test accuracy against wall time and against step, mean of seeds with min-max bands."""
    plt = _plt()
    tasks = result["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    for row, (task, modes) in zip(axes, tasks.items()):
        for mode, runs in modes.items():
            for ax, key in zip(row, ("time", "step")):
                xs = np.array([r[key] for r in runs], dtype=float)
                ys = np.array([r["top1"] for r in runs], dtype=float)
                length = min(len(x) for x in xs) if xs.ndim > 1 else xs.shape[-1]
                x = xs[:, :length].mean(axis=0)
                if mode == "async" and key == "step":
                    x = x / result["ranks"]  # one async step is one rank's update: N of them per sync step
                y = ys[:, :length]
                line, = ax.plot(x, y.mean(axis=0), label=mode)
                ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=line.get_color(), alpha=0.2)
        row[0].set_title(f"{task}: top-1 against wall time", fontsize=9)
        row[1].set_title(f"{task}: top-1 against step (async: updates / N)", fontsize=9)
        row[0].set_xlabel("seconds")
        row[1].set_xlabel("global step")
        for ax in row:
            ax.set_ylabel("test top-1")
        row[0].legend(fontsize=8)
    fig.suptitle(f"Time to accuracy, {result['ranks']} ranks, delays {result['straggler']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def counter(results: list[dict], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for transport in ("shm", "tcp"):
        rows = sorted((r for r in results if r["transport"] == transport), key=lambda r: r["ranks"])
        ns = [r["ranks"] for r in rows]
        axes[0].plot(ns, [r["alone_median_us"] for r in rows], "o-", label=f"{transport}: one rank alone")
        axes[0].plot(ns, [r["contended_median_us"] for r in rows], "s--", label=f"{transport}: all ranks at once")
        axes[1].plot(ns, [r["contended_ops_per_s"] for r in rows], "o-", label=transport)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("us per fetch-and-op (median)")
    axes[1].set_ylabel("fetch-and-ops per second at the host")
    for ax in axes:
        ax.set_xlabel("ranks (on 2 cores)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(run: dict) -> str:
    """sync, b~5% / b~10% of N, auto, async: the scale study's modes, whatever b they came to at each N."""
    if "label" in run:
        return run["label"]
    if run["mode"] != "backup":
        return run["mode"]
    b = run["backup_workers"]
    if b == "auto":
        return "auto"
    return "b~5%" if b == max(1, round(0.05 * run["ranks"])) else "b~10%"


_STYLE = {"sync": ("tab:blue", "-"), "b~5%": ("tab:orange", "-"), "b~10%": ("tab:red", "-"),
          "auto": ("tab:green", "--"), "async": ("tab:purple", "-")}


def scale_curves(runs: list[dict], path: str, part: str) -> None:
    """Test top-1 against simulated time, one panel per N (columns) and delay model (rows), a line per mode."""
    plt = _plt()
    runs = [r for r in runs if r["part"] == part]
    delays = list(dict.fromkeys(r["delay"] for r in runs))
    ranks = sorted({r["ranks"] for r in runs})
    fig, axes = plt.subplots(len(delays), len(ranks), figsize=(3.1 * len(ranks), 2.5 * len(delays)), squeeze=False)
    for row, delay in zip(axes, delays):
        for ax, n in zip(row, ranks):
            for r in (r for r in runs if r["delay"] == delay and r["ranks"] == n):
                color, ls = _STYLE.get(_label(r), (None, "-"))
                b = f" (b={r['backup_workers']})" if r["mode"] == "backup" and r["backup_workers"] != "auto" else ""
                ax.plot([e["time"] for e in r["evals"]], [e["top1"] for e in r["evals"]], color=color, ls=ls,
                        label=_label(r) + b)
            ax.set_title(f"N={n}, {delay}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
        row[0].set_ylabel("test top-1", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("simulated seconds", fontsize=8)
    fig.suptitle(f"{part}: test accuracy against time, virtual cluster", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def scale_vs_n(runs: list[dict], path: str, parts=("digits", "synthetic")) -> None:
    """Per task (rows): final top-1, time to the target, and async staleness against N; a line per mode, solid
    for heavy-tailed delays and dashed for one slow worker."""
    plt = _plt()
    fig, axes = plt.subplots(len(parts), 3, figsize=(11, 3.0 * len(parts)), squeeze=False)
    for row, part in zip(axes, parts):
        runs_here = [r for r in runs if r["part"] == part]
        for delay, ls in (("heavy-tailed", "-"), ("one-slow", ":")):
            for label, (color, _) in _STYLE.items():
                rs = sorted((r for r in runs_here if r["delay"] == delay and _label(r) == label),
                            key=lambda r: r["ranks"])
                if not rs:
                    continue
                ns = [r["ranks"] for r in rs]
                row[0].plot(ns, [r["final_top1"] for r in rs], "o", color=color, ls=ls, ms=3,
                            label=f"{label}, {delay}")
                reached = [(r["ranks"], r["time_to_target_s"]) for r in rs if r["time_to_target_s"] is not None]
                if reached:
                    row[1].plot(*zip(*reached), "o", color=color, ls=ls, ms=3)
                if label == "async":
                    row[2].plot(ns, [r["mean_staleness"] for r in rs], "o", color=color, ls=ls, ms=3,
                                label=f"mean, {delay}")
                    row[2].plot(ns, [r["p99_staleness"] for r in rs], "^", color="grey", ls=ls, ms=3,
                                label=f"p99, {delay}")
        target = runs_here[0]["target"] if runs_here else None
        row[0].set_title(f"{part}: final test top-1", fontsize=9)
        row[1].set_title(f"{part}: simulated seconds to top-1 {target}", fontsize=9)
        row[2].set_title(f"{part}: async staleness (updates)", fontsize=9)
        row[1].set_yscale("log")
        ns = sorted({r["ranks"] for r in runs_here})
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("workers N", fontsize=8)
            ax.tick_params(labelsize=7)
        row[0].legend(fontsize=5, ncol=2)
        row[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def b_sweep(runs: list[dict], path: str) -> None:
    """Final top-1 and time to the target against b, at the N and delays of the b-sweep part (with the runs of
    the same N, task and delays from the main comparison: sync is b = 0)."""
    plt = _plt()
    sweep = [r for r in runs if r["part"] == "b-sweep"]
    n, task, delay = sweep[0]["ranks"], sweep[0]["task"], sweep[0]["delay"]
    same = [r for r in runs if r["part"] in ("b-sweep", task) and r["ranks"] == n and r["delay"] == delay
            and (r["mode"] == "sync" or (r["mode"] == "backup" and r["backup_workers"] != "auto"))]
    rs = sorted(same, key=lambda r: 0 if r["mode"] == "sync" else r["backup_workers"])
    bs = [0 if r["mode"] == "sync" else r["backup_workers"] for r in rs]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(bs, [r["final_top1"] for r in rs], "o-", color="tab:blue", label="final top-1")
    ax.set_xlabel(f"backup workers b ({task}, N = {n}, {delay} delays)", fontsize=8)
    ax.set_ylabel("final test top-1", color="tab:blue")
    other = ax.twinx()
    other.plot(bs, [r["time_s"] for r in rs], "s--", color="tab:red", label="simulated seconds, whole run")
    reached = [(b, r["time_to_target_s"]) for b, r in zip(bs, rs) if r["time_to_target_s"] is not None]
    if reached:
        other.plot(*zip(*reached), "^:", color="tab:orange", label=f"seconds to top-1 {rs[0]['target']}")
    other.set_ylabel("simulated seconds", color="tab:red")
    other.set_ylim(bottom=0)
    fig.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
