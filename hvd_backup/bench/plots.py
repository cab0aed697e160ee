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
