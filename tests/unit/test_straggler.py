"""The straggler spec: parsing, determinism, and a table of scenarios with the delays they must produce."""

import pytest

from mpi_tools import StragglerInjector, parse_spec

SCENARIOS = [
    # spec, rank, size, step, compute_s, expected delay
    ("none", 0, 4, 0, 0.0, 0.0),
    ("fixed:delay=2,rank=3", 3, 4, 5, 0.0, 2.0),
    ("fixed:delay=2,rank=3", 2, 4, 5, 0.0, 0.0),
    ("fixed:delay=0.5,rank=1-2", 2, 4, 0, 0.0, 0.5),
    ("fixed:delay=0.5,rank=0/3", 3, 4, 0, 0.0, 0.5),
    ("fixed:delay=0.5,rank=0/3", 1, 4, 0, 0.0, 0.0),
    ("slow:factor=10,rank=2", 2, 4, 7, 0.03, 0.27),
    ("slow:factor=10,rank=2", 1, 4, 7, 0.03, 0.0),
    ("fixed:delay=1+fixed:delay=0.25,rank=1", 1, 2, 0, 0.0, 1.25),
]


@pytest.mark.parametrize("spec,rank,size,step,compute,expected", SCENARIOS)
def test_scenarios(spec, rank, size, step, compute, expected):
    assert StragglerInjector(spec, rank=rank, size=size).delay(step, compute) == pytest.approx(expected)


@pytest.mark.parametrize("spec", ["exp:mean=0.05", "lognormal:median=0.02,sigma=1", "tail:p=0.3,delay=1"])
def test_random_delays_are_seeded_per_rank_and_step(spec):
    a = StragglerInjector(spec, rank=1, size=4, seed=7).table(50)
    b = StragglerInjector(spec, rank=3, size=4, seed=7).table(50)
    c = StragglerInjector(spec, rank=1, size=4, seed=8).table(50)
    assert (a == b).all()  # every rank computes the same table: the delays depend on (seed, term, rank, step)
    assert not (a == c).all()
    assert (a >= 0).all() and len(set(a[:, 0])) > 1


def test_tail_probability_is_respected():
    table = StragglerInjector("tail:p=0.2,delay=1", rank=0, size=8, seed=3).table(500)
    assert 0.15 < (table > 0).mean() < 0.25


BAD = [
    ("warp:x=1", "unknown kind 'warp'"),
    ("fixed", "fixed needs delay"),
    ("fixed:delay=abc", "delay='abc' is not a number"),
    ("fixed:delay=-1", "must be a finite number >= 0"),
    ("fixed:speed=1", "fixed takes delay, rank, not 'speed'"),
    ("fixed:delay=1,rank=x", "rank='x' is not"),
    ("tail:p=2,delay=1", "p=2.0 is a probability"),
    ("slow:factor=0.5", "factor=0.5 must be >= 1"),
    ("exp:mean", "'mean' is not key=value"),
]


@pytest.mark.parametrize("spec,message", BAD)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_spec(spec)


def test_rank_beyond_world_is_an_error():
    with pytest.raises(ValueError, match="names rank 5, but there are only 4 ranks"):
        StragglerInjector("fixed:delay=1,rank=5", rank=0, size=4)
