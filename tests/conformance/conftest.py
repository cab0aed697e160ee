"""The multi-rank fixtures of tests/mpi (``comm``, ``hvd``, and ``backend``: each test once per backend)."""

from tests.mpi.conftest import backend, comm, hvd  # noqa: F401 - fixtures
