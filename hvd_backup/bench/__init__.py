"""``make bench``: the benchmarks and experiments (:mod:`.suite` runs them; each module is one experiment that
runs on every rank of an MPI job), with their plots and a summariser of trainer metrics files."""
