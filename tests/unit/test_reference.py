"""The reference the multi-rank tests compare against (tests/mpi/reference.py), on hand-made runs: it computes
the mean of the included gradients with the first arriver's hyper-parameters, and it notices a run that went
otherwise."""

from types import SimpleNamespace

import pytest
import torch

from tests.mpi.reference import HandedIn, Mismatch, RankLog, check_final, exact, replay


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def record(step, included, count=None):
    return SimpleNamespace(step=step, included=tuple(included), count=len(included) if count is None else count)


def run_by_hand(steps=3):
    """Three ranks, b = 1: per step the gradients each rank hands in, the arrival orders, and what the protocol
    must compute, worked out step by step with the tensor operations of torch's SGD with momentum."""
    start = [torch.tensor([1.0, -2.0]), torch.tensor([0.5])]
    params = [t.clone() for t in start]
    momentum = [torch.zeros_like(t) for t in start]
    logs = [RankLog(rank, [], {}, steps, []) for rank in range(3)]
    records = []
    gen = torch.Generator().manual_seed(0)
    for t in range(steps):
        orders = {0: [1, 0, 2], 1: [0, 2, 1], 2: [2, 1, 0]}[t]  # orders[rank]: who came first, second, late
        lrs = [0.1 * (rank + 1) * (t + 1) for rank in range(3)]
        grads = [[exact(torch.randn(p.shape, generator=gen)) for p in params] for _ in range(3)]
        for rank in range(3):
            logs[rank].handed_in.append(HandedIn(t, [p.clone() for p in params], grads[rank],
                                                 [{"lr": lrs[rank], "momentum": 0.9}]))
            logs[rank].arrivals[t] = orders[rank]
        included = [r for r in range(3) if orders[r] < 2]
        first = orders.index(0)
        for i, p in enumerate(params):
            mean = (grads[included[0]][i] + grads[included[1]][i]) / 2  # exact gradients: any order
            momentum[i] = mean.clone() if t == 0 else momentum[i].mul_(0.9).add_(mean)
            p.add_(momentum[i], alpha=-lrs[first])
        records.append(record(t, included))
    return start, logs, records, params, momentum


def test_replay_computes_the_mean_of_the_included_with_the_first_arrivers_rate():
    start, logs, records, params, momentum = run_by_hand()
    final, states = replay(start, sgd, records, logs)
    for mine, ref, buf, state in zip(params, final, momentum, states):
        assert torch.equal(ref, mine) and torch.equal(state["momentum_buffer"], buf)


def test_replay_notices_a_wrong_included_set():
    start, logs, records, _, _ = run_by_hand()
    records[1] = record(1, [1, 2])
    with pytest.raises(Mismatch, match="step 1: the records say 2 included, ranks \\[1, 2\\]"):
        replay(start, sgd, records, logs)


def test_replay_notices_a_gradient_computed_on_other_parameters():
    start, logs, records, _, _ = run_by_hand()
    logs[2].handed_in[2].params[0] += 1e-6  # rank 2's catch-up brought it to the wrong parameters
    with pytest.raises(Mismatch, match="step 2: rank 2 computed its gradient on parameters other than"):
        replay(start, sgd, records, logs)


def test_check_final_notices_a_rank_that_ended_elsewhere():
    start, logs, records, _, _ = run_by_hand()
    final, states = replay(start, sgd, records, logs)
    for log in logs:
        log.final_params = [p.clone() for p in final]
        log.final_state = [{k: v.clone() for k, v in s.items()} for s in states]
    check_final(logs, final, states, 3)
    logs[1].final_state[0]["momentum_buffer"][0] += 1e-7
    with pytest.raises(Mismatch, match="rank 1: the optimizer state of parameter 0 differs"):
        check_final(logs, final, states, 3)
