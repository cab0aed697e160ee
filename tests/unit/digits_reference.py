"""The digits CNN trained by hand, as the virtual cluster must train it: each step, every rank whose gradient
counts for some parameter computes one on its next batch (its shard of epoch 0), and each parameter takes the
mean over its own ranks, then SGD with momentum and weight decay at the schedule's warm-up learning rate."""

import torch

from hvd_backup.train.data import ShardBatches, load_dataset
from hvd_backup.train.models import build_model


def digits_reference(cfg, n: int, steps: list[list[tuple[int, ...]]]) -> torch.nn.Module:
    """``steps``: per step, per parameter (in the model's order), the ranks whose gradients it averages. The
    learning rate is the trainer's for N - b ranks of 8 samples, warming up."""
    torch.manual_seed(cfg.seed)
    model = build_model("digits_cnn", num_classes=10, channels=1)
    train = load_dataset("digits").train
    x_all, y_all = train.tensors
    shards = {rank: iter(ShardBatches(len(train), rank=rank, size=n, batch_size=8, seed=cfg.seed, epoch=0))
              for rank in range(n)}
    momentum = [torch.zeros_like(p) for p in model.parameters()]
    for step, members in enumerate(steps):
        grads = {}
        for rank in sorted(set().union(*members)):
            batch = next(shards[rank])
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x_all[batch]), y_all[batch]).backward()
            grads[rank] = [p.grad.clone() for p in model.parameters()]
        lr = cfg.lr * (n - cfg.backup_workers) * 8 / 256 * (step + 1) / cfg.warmup_steps
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                mean = sum(grads[r][i] for r in members[i]) / len(members[i])
                momentum[i] = cfg.momentum * momentum[i] + mean + cfg.weight_decay * p
                p -= lr * momentum[i]
    return model
