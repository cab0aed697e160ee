"""Train an image classifier with backup workers (or plain sync / async SGD, for comparison).

    horovodrun -np 4 hvd-backup-train                                    # digits, b=1, to >= 0.95 in a minute
    horovodrun -np 8 hvd-backup-train --backup-workers 2 --straggler 'exp:mean=0.02'
    mpirun -np 4 hvd-backup-train --backend mpi --straggler 'fixed:delay=0.5,rank=3'   # no Horovod needed
    srun hvd-backup-train --dataset imagenet --data /datasets/imagenet -a resnet50 -b 64 --epochs 90 \\
        --backup-workers 2 --checkpoint-dir ckpt --checkpoint-every 1000 --resume

The loop runs on the global step: a rank that was dropped catches up instead of computing every step, so
epochs, evaluations, checkpoints and the end are decided by global steps that all ranks agree on. SIGUSR1
(e.g. Slurm's ``--signal``) makes every rank stop after the same step; rank 0 writes a checkpoint and the job
exits with code 3 (``EXIT_PREEMPTED``), for a batch script to requeue.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import traceback

from .console import EXIT_USAGE, print0


def main(argv: list[str] | None = None) -> int:
    """Run the job; bad input gives one line from rank 0 and exit code 2 on every rank, never a hang."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    from .. import lifecycle
    from ..errors import HangError, ProtocolError, RankFailedError, UserError, agree, report, same_on_every_rank

    try:
        from .config import parse_args

        quiet = contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext()
        with quiet:  # --help once, not once per rank
            cfg = agree(comm, lambda: parse_args(argv))
        agree(comm, lambda: same_on_every_rank(comm, cfg.public(), lambda key: f"--{key.replace('_', '-')}"))
        agree(comm, lambda: cfg.check_world(comm.Get_size()))
        from .trainer import Trainer

        trainer = agree(comm, lambda: Trainer(cfg, comm))
        return trainer.run()
    except UserError as exc:
        print0(rank, f"hvd-backup-train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (HangError, ProtocolError, RankFailedError) as exc:
        # One line per live rank (the protocol's thread may have printed it already); then take every rank down.
        report(exc, rank)
        lifecycle.abort(comm)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - this rank's own failure: its traceback, then the others learn it
        traceback.print_exc()
        lifecycle.announce(exc)
        time.sleep(lifecycle.GRACE_S)
        lifecycle.abort(comm)
    return 1


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
