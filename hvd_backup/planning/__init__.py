"""Choosing b before and during a run: the zero-overhead simulation of the protocol (:mod:`.simulate`), the
planner behind ``hvd-backup-plan`` (:mod:`.plan`), and the virtual cluster that trains N workers' worth of real
SGD on that simulation's clock (:mod:`.virtual`)."""
