"""Choosing b before and during a run: the zero-overhead simulation of the protocol (:mod:`.simulate`) and the
planner behind ``hvd-backup-plan`` (:mod:`.plan`)."""
