"""The flat gradient buffer's layout with ``overlap``: bucket after bucket in the order they are posted (the last
parameters first), so each bucket is one element range and the last one ends where the metadata starts."""

import torch

from hvd_backup.buckets import bucket_groups
from hvd_backup.tensors import Consensus


def test_buckets_tile_the_buffer_in_posting_order_and_the_last_ends_at_the_gradients_end():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (300, 40, 500, 70, 260)]
    opt = torch.optim.SGD(params, lr=0.1)
    side = Consensus(opt, torch.optim.SGD, {})
    sizes = [p.numel() for p in params]
    groups = bucket_groups(sizes, itemsize=4, cap_mb=1.2e-3, first_mb=1e-3)  # 262, then 314 elements
    assert [list(g) for g in groups] == [[3, 4], [2], [0, 1]]  # from the last parameter backwards
    ranges = side.arrange(groups)
    side.reserve(7)
    assert ranges == [(0, 330), (330, 830), (830, 1170)] and ranges[-1][1] == side.numel
    assert side.send.numel() == side.numel + 7
    base = side.send.data_ptr()
    for (lo, hi), group in zip(ranges, groups):
        views = side.views(side.send)
        covered = sorted((views[i].data_ptr() - base) // 4 + k for i in group for k in range(sizes[i]))
        assert covered == list(range(lo, hi))
