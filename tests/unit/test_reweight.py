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
                           _last_done=time.monotonic(), _last_duration=0.0, members=None,
                           attached_count=lambda: size)


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


def test_metadata_folded_into_float32_survives_a_sum_with_the_other_ranks_zeros_bit_for_bit():
    """Where the gradients are float32 the metadata travels at the end of the last bucket: every float64 value as
    three float32 integers, which a sum with zeros (the other ranks' columns) leaves exact, whatever the value."""
    import math

    n = 5
    layout = Meta(n, hyper_len=3, params=4)
    columns = []
    for r in range(n):  # each rank writes its own column; rank 2 is the first arriver
        meta = torch.zeros(layout.length, dtype=torch.float64)
        for block, value in enumerate([1.7e9 + r / 3, Meta.IN, 0.123456789 * r, math.nan if r == 4 else -2.5 * r - 1,
                                       0.0, 5e-324 * r, float(r % 2)]):
            meta[block * n + r] = value
        if r == 2:
            meta[layout.hyper_at:layout.flags_at] = torch.tensor([0.1, float("inf"), -1e-300], dtype=torch.float64)
            meta[layout.flags_at + Meta.UNSCALE] = 2.0 ** -16
        meta[layout.present_at:] = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        columns.append(meta)
    expected = torch.zeros(layout.length, dtype=torch.float64)
    for meta in columns:  # what the float64 allreduce gives: each slot has one writer, the counts add up
        expected += meta
    total = torch.zeros(layout.folded_length, dtype=torch.float32)
    for meta in columns:
        folded = torch.full((layout.folded_length,), -1.0)
        layout.fold(meta, folded)
        assert torch.equal(folded, folded.round()) and folded.abs().max() < 2 ** 22  # integers float32 holds
        total += folded
    back = torch.zeros(layout.length, dtype=torch.float64)
    layout.unfold(total, back)
    assert torch.equal(back.view(torch.int64), expected.view(torch.int64))
    assert back[layout.present_at:].tolist() == [5.0, 0.0, 5.0, 5.0]
    one = torch.zeros(layout.length, dtype=torch.float64)
    one[0] = -0.0
    layout.fold(one, total)
    layout.unfold(total + 0.0, back)
    assert back[0].item() == 0.0 and math.copysign(1.0, back[0].item()) == -1.0  # even the sign of a zero
