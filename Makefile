# hvd_backup. `make demo` and `make test` set everything up on first use (see scripts/setup.sh).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
GPU ?= 0
STAMP := $(VENV)/.setup-done-gpu$(GPU)
LAUNCH := $(PY) -m mpi_tools.launch
# Every multi-rank pytest run: each rank aborts with all stacks when a test passes this many seconds.
export HVD_BACKUP_TEST_TIMEOUT ?= 240
export HVD_BACKUP_JUNIT_DIR ?= reports
MPI_PYTEST := $(PY) -m mpi4py -m pytest tests/mpi -q --color=no -p no:cacheprovider --capture=sys

.PHONY: setup demo test test-unit test-mpi test-mpi-np4 test-conformance test-conformance-more test-horovodrun test-train test-faults test-slurm test-multihost bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/build_horovod.sh
	GPU=$(GPU) bash scripts/setup.sh $(VENV)
	touch $@

demo: setup
	$(PY) -m hvd_backup.train.demo

test: setup test-unit test-mpi test-conformance test-horovodrun test-train test-faults test-slurm test-multihost

test-unit: setup
	$(PY) -m pytest tests/unit -q --color=no

# The multi-rank suite on 2 ranks with shared memory and on 4 without (TCP only, like nodes without RDMA); 4 ranks
# with shared memory run the conformance suite and the fault jobs (`make test-mpi-np4` runs this suite there too).
test-mpi: setup
	HVD_BACKUP_RUN_TAG=np2 $(LAUNCH) -np 2 --timeout 600 -- $(MPI_PYTEST)
	HVD_BACKUP_RUN_TAG=np4-noshm $(LAUNCH) -np 4 --no-shm --timeout 600 -- $(MPI_PYTEST)

test-mpi-np4: setup
	HVD_BACKUP_RUN_TAG=np4 $(LAUNCH) -np 4 --timeout 600 -- $(MPI_PYTEST)

# Users' own training loops through the public API (tests/conformance), both backends: on 2 ranks with the
# gradients handed in during backward (overlap=True for every optimizer the suite wraps), on 4 ranks at step();
# then, one job each, the idioms whose failure takes a job down and the failure idioms (a rank raises, freezes).
# `make test-conformance-more` runs the other two combinations.
CONFORMANCE := $(PY) -m mpi4py -m pytest tests/conformance --ignore=tests/conformance/jobs -q --color=no \
	-p no:cacheprovider --capture=sys
test-conformance: setup
	HVD_BACKUP_TEST_OVERLAP=1 HVD_BACKUP_TEST_TIMEOUT=120 HVD_BACKUP_RUN_TAG=conformance-np2-overlap \
		$(LAUNCH) -np 2 --timeout 900 -- $(CONFORMANCE)
	HVD_BACKUP_TEST_TIMEOUT=120 HVD_BACKUP_RUN_TAG=conformance-np4 $(LAUNCH) -np 4 --timeout 900 -- $(CONFORMANCE)
	$(PY) -m pytest tests/conformance/jobs -q --color=no -rA --junitxml=reports/conformance-jobs.xml

test-conformance-more: setup
	HVD_BACKUP_TEST_TIMEOUT=120 HVD_BACKUP_RUN_TAG=conformance-np2 $(LAUNCH) -np 2 --timeout 900 -- $(CONFORMANCE)
	HVD_BACKUP_TEST_OVERLAP=1 HVD_BACKUP_TEST_TIMEOUT=120 HVD_BACKUP_RUN_TAG=conformance-np4-overlap \
		$(LAUNCH) -np 4 --timeout 900 -- $(CONFORMANCE)

# One run through Horovod's own launcher.
test-horovodrun: setup
	HVD_BACKUP_RUN_TAG=horovodrun-np2 timeout -k 10 600 $(VENV)/bin/horovodrun -np 2 $(MPI_PYTEST) -k "platform or sleeping or equals_horovod"

# The trainer end to end (real mpirun jobs) and its bad-input table.
test-train: setup
	$(PY) -m pytest tests/e2e -q --color=no

# What clusters do to jobs (slow, killed, frozen ranks; crashes; a soak), the bad-input table, and the protocol's
# failure paths in a user's own loop (2 and 4 ranks, with and without shared memory).
test-faults: setup
	$(PY) -m pytest tests/faults -q --color=no -rA --junitxml=reports/faults.xml

# The batch templates on a real local Slurm (installed with apt when missing; daemons stopped afterwards).
test-slurm: setup
	$(PY) -m pytest tests/slurm -q --color=no -rA

# Launchers (mpirun --host, horovodrun -H, Slurm) and faults (cut links, a lost host, a slow link) across emulated
# hosts: network namespaces on a bridge, made and removed by the tests (needs root; see mpi_tools/hosts.py).
test-multihost: setup
	$(PY) -m pytest tests/multihost -q --color=no -rA --junitxml=reports/multihost.xml

bench: setup
	$(PY) -m hvd_backup.bench

clean:
	rm -rf $(VENV) reports runs build *.egg-info
