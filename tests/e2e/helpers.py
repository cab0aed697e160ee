"""Helpers for end-to-end tests: launch the real trainer on real ranks, and write data in real on-disk formats."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
import tempfile
import time

import numpy as np

from hvd_backup.train.metrics import of_type, read_metrics, summary_of
from mpi_tools.launch import finish, run, start

TRAIN = [sys.executable, "-m", "hvd_backup.train"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Jobs started by background() and not yet ended: tests/conftest.py ends them after every test, so a test that
# fails (or reaches its deadline) before it ends its job leaves nothing running.
RUNNING = []


def launch(np_: int, args: list[str], *, timeout: float = 180, shm: bool = True, env: dict | None = None,
           program: list[str] | None = None, tag_output: bool = False, **placement):
    """Run the trainer (or ``program``) on ``np_`` ranks; returns a CompletedProcess with ``stdout`` captured
    (with ``tag_output``, each line prefixed by ``[job,rank]<stdout|stderr>:``). ``placement``: mpirun's
    ``options``, ``hosts`` and ``wrapper`` (see :func:`mpi_tools.launch.mpirun_command`)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    return run(np_, (program or TRAIN) + list(args), timeout=timeout, shm=shm, env=full_env, capture=True, cwd=ROOT,
               tag_output=tag_output, **placement)


def background(np_: int, args: list[str], log_path, *, shm: bool = True, program: list[str] | None = None,
               env: dict | None = None, **placement):
    """Start the trainer (or ``program``) on ``np_`` ranks without waiting; its output goes to ``log_path``.
    ``placement``: mpirun's ``options``, ``hosts`` and ``wrapper``; ``env``: more environment variables."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               **(env or {}))
    log = open(log_path, "w")
    proc = start(np_, (program or TRAIN) + list(args), env=env, cwd=ROOT, output=log, shm=shm, **placement)
    RUNNING.append(proc)
    return proc


@contextlib.contextmanager
def own_session():
    """The environment that gives one job a folder of its own for its Open MPI session directory
    (``OMPI_MCA_orte_tmpdir_base``), short enough for the runtime's socket paths; the folder is removed on exit.
    Jobs that share /tmp/ompi.HOST.UID race on it: mpiruns started at the same moment to create it (the loser
    fails in orte_init with "File exists"), and one ending while the next starts to remove it (the next cannot
    open its shared-memory files)."""
    path = tempfile.mkdtemp(prefix="hvdb-ompi-", dir="/tmp")
    try:
        yield {"OMPI_MCA_orte_tmpdir_base": path}
    finally:
        shutil.rmtree(path, ignore_errors=True)


def end_background_jobs() -> None:
    """Kill every job from background() that is still running (all of its processes)."""
    while RUNNING:
        finish(RUNNING.pop(), 0)


def wait_until(predicate, proc, timeout: float, what: str) -> None:
    """Poll ``predicate()`` until true; fail if the job ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.02)


def last_step(metrics_path) -> int:
    """The newest step record's step in a metrics file being written (-1 if none yet)."""
    steps = of_type(read_metrics(metrics_path, partial=True), "step")
    return steps[-1]["step"] if steps else -1


def summary(path) -> dict:
    return summary_of(read_metrics(path))


def write_cifar10(root, *, per_batch: int = 16, test: int = 20, seed: int = 0) -> str:
    """CIFAR-10's python format: cifar-10-batches-py/ with pickled data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def batch(name, n):
        labels = rng.integers(0, 10, n).tolist()
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(n)]}, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch)
    batch("test_batch", test)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f)
    return str(root)


def write_imagefolder(root, *, classes: int = 3, per_class: int = 6, size: int = 40, seed: int = 0) -> str:
    """An ImageNet-style folder: train/ and val/, one sub-folder of JPEGs per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img_{i}.JPEG"), quality=85)
    return str(root)
