"""The backup-worker step protocol, run by one communication thread per rank (:mod:`.engine`).

Every global step ``t``, on every one of the N ranks, with quorum ``k = N - b``:

1. **Arrive** (:mod:`.arrive`). When this rank's gradient for step ``t`` is ready (computed on the parameters of
   version ``t``), the communication thread arrives with ONE atomic fetch-and-add on step ``t``'s counter word
   (:class:`mpi_tools.ArrivalCounter`). An arrival that saw fewer than ``k`` arrivals and no close is included.
   With ``k = N`` and no timeout close every arrival is in: the fetch-and-add then follows the first allreduce.
2. **Close** (:mod:`.arrive`; the timeout close in :mod:`.contribute`). The step closes when ``k`` ranks have
   arrived or, with ``straggler_timeout``, when the step's first arriver closes it that many seconds after its own
   arrival, once ``min_workers`` have arrived. The close is a fetch-and-add on the same word, so it is atomic with
   the arrivals and all ranks agree on who was in. A rank whose gradient is not ready learns that its step closed
   from the close notice of the rank that completed it (:mod:`.notice`), or by reading the word now and then. A
   rank that has left its loop (``close()``) adds a stop to every step's word instead; a step also closes once
   every rank that has not left arrived. Step 0 waits for every rank (start-up).
3. **Contribute** (:mod:`.contribute`). Every rank posts the step's nonblocking allreduce: included ranks their
   gradients, all others zeros. A slow rank's thread posts its zeros
   while its training thread is still busy, so the others never wait for its gradient. The step's metadata
   travels with it (folded into the float32 tail of the last bucket, or a small float64 allreduce of its own):
   per-rank arrival records and statuses (their sum is the included count, exact), the first arriver's
   hyper-parameters (learning rate, momentum, ...) and, per parameter, how many included ranks had a gradient.
4. **Reweight** (:mod:`.reweight`, then :mod:`.apply`). The reduced buffer holds the sum of the included gradients;
   every rank divides by their count, takes the first arriver's hyper-parameters and applies the
   identical update: to the live parameters when its training thread is waiting for this step, else to a consensus
   copy. Parameters stay bit-identical on all ranks.
5. **Catch up** (:mod:`.apply`). A gradient computed on parameters older than the current step is dropped; the
   consensus copy (parameters and optimizer state) is copied into the live ones in one go, and the training thread
   computes its next gradient on current parameters. Memory is one consensus copy however far behind a rank is.
6. **Isolate** (:mod:`.engine`). Step ``t`` uses counter word ``t mod slots``. The counter's host resets word ``t -
   1`` after step ``t``'s allreduce completed on it: every rank has then posted step ``t``, so nothing can still
   touch word ``t - 1``, and the reset is ordered before any arrival of step ``t - 1 + slots``.
7. **Never hang** (:mod:`.watchdog`). A watchdog fails a step that is not complete within ``hang_timeout`` with an
   error naming the step and the ranks that never contributed (from per-rank marks in the counter window), raises
   it in the training thread, and aborts the job if the process is still alive shortly after. A rank whose script
   failed says so in the window's failure word; the others raise ``RankFailedError`` within about a second
   (:mod:`hvd_backup.lifecycle` handles the way out of the process).

With ``detach_after`` (:mod:`.detach`) the counter's host detaches a rank whose link makes every step slow: the
others count and reduce among themselves, it follows by state transfers, and joins again at an agreed step.

The engine's needs from the tensors and from the allreduce are the two protocols in :mod:`.interface`;
:mod:`.adaptive` re-chooses b for ``backup_workers="auto"``.
"""

from .engine import StepEngine
from .interface import Backend, TensorSide

__all__ = ["Backend", "StepEngine", "TensorSide"]
