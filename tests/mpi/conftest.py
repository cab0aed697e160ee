"""Fixtures for tests that run on every rank of an MPI job (``mpirun -np N python -m mpi4py -m pytest``).

They also run alone (one rank); tests that need more ranks skip there.
"""

import pytest
from mpi4py import MPI


@pytest.fixture(scope="session")
def comm():
    return MPI.COMM_WORLD


@pytest.fixture(scope="session")
def hvd(comm):
    hvd = pytest.importorskip("horovod.torch")
    hvd.init(comm=comm)
    return hvd


@pytest.fixture(params=["mpi", "horovod"])
def backend(request):
    if request.param == "horovod":
        request.getfixturevalue("hvd")
    return request.param

