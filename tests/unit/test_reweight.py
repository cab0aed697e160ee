"""Step 4's arithmetic on its own, at a number of ranks no test machine runs: the included count is exact in any
parameter dtype, and the reduced sum is divided by it (not by N)."""

import time
from types import SimpleNamespace

import torch

from hvd_backup.protocol.reweight import reweight
from hvd_backup.protocol.state import Meta, StepState


def _engine(size: int, included: list[int], params: int = 1):
    layout = Meta(size, hyper_len=1, params=params)
    meta = torch.zeros(layout.length, dtype=torch.float64)
    for r in range(size):
        meta[Meta.STATUS * size + r] = Meta.IN if r in included else Meta.ABSENT
        meta[Meta.ARRIVAL * size + r] = 0.0
    meta[layout.hyper_at] = 0.1
    meta[layout.flags_at + Meta.UNSCALE] = 1.0  # the first arriver's: the gradients travelled unscaled
    meta[layout.present_at:] = len(included)
    return SimpleNamespace(size=size, layout=layout, _meta=meta, quorum=size - 1, op="average", predivide=1.0,
                           _last_done=time.monotonic(), _last_duration=0.0)


def test_count_is_exact_for_bf16_gradients_at_257_included_ranks():
    n = 300
    included = list(range(257))  # 257 is the first integer bfloat16 cannot hold
    assert float(torch.tensor(257.0, dtype=torch.bfloat16)) != 257.0
    eng = _engine(n, included)
    buf = torch.full((4,), 257.0 * 2.0, dtype=torch.bfloat16)  # the sum of 257 gradients of 2.0
    record, hyper, present = reweight(eng, StepState(7), buf)
    assert record.count == 257 and record.included == tuple(included)
    assert hyper == [0.1] and present.tolist() == [True]
    assert torch.equal(buf, torch.full((4,), 257.0 * 2.0, dtype=torch.bfloat16) / 257)


def test_the_mean_is_over_the_included_ranks_not_n():
    eng = _engine(8, [0, 3, 5])
    buf = torch.tensor([3.0, 6.0, -9.0], dtype=torch.float64)
    record, _, _ = reweight(eng, StepState(0), buf)
    assert record.count == 3 and record.closed_by == "timeout"
    assert buf.tolist() == [1.0, 2.0, -3.0]
