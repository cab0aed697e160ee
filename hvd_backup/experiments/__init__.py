"""Experiments and benchmarks: the zero-overhead simulation of the protocol, the overhead benchmark, and the
studies behind docs/RESULTS.md. ``python -m hvd_backup.bench`` runs them."""
