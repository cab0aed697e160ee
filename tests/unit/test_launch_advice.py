"""The advice the counter's host prints at start-up about the launcher (hvd_backup.lifecycle)."""


def test_mpirun_across_hosts_without_keepalives_gets_advice():
    from hvd_backup.lifecycle import keepalive_advice

    mpirun = {"OMPI_MCA_orte_launch": "1"}
    advice = keepalive_advice(["h1", "h1", "h2"], mpirun)
    assert advice and "2 hosts" in advice and "--mca oob_tcp_keepalive_time 20" in advice
    assert keepalive_advice(["h1", "h2"], dict(mpirun, OMPI_MCA_oob_tcp_keepalive_time="2")) is None
    assert keepalive_advice(["h1", "h1"], mpirun) is None  # one host: nothing to lose
    assert keepalive_advice(["h1", "h2"], {}) is None  # srun: no Open MPI runtime of its own
