"""The training application behind ``hvd-backup-train`` and ``python -m hvd_backup.train``: the command line
(:mod:`.cli`, :mod:`.config`), the loop (:mod:`.trainer`) and its parts (:mod:`.optimizers`,
:mod:`.evaluation`, :mod:`.checkpoint`, :mod:`.metrics`), data and models (:mod:`.data`, :mod:`.models`,
:mod:`.catalog`), and ``make demo`` (:mod:`.demo`). Nothing heavy is imported here: bad flags fail fast."""

from .cli import cli, main

__all__ = ["cli", "main"]
