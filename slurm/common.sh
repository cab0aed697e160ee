# Shared by slurm/*.sh (sourced, not submitted): the launcher, GPU settings for Horovod, preemption, requeue.
# Variables (set them in the environment or at the top of a template):
#   HVD_BACKUP_ROOT   the checkout (default: the folder you ran sbatch from)
#   VENV              its virtual environment (default: $HVD_BACKUP_ROOT/.venv, made by `make setup GPU=1`)
#   LAUNCHER          srun (default; PMIx or PMI2, whichever the cluster offers) or mpirun
#   SRUN_MPI          force srun's --mpi plug-in (pmix, pmi2, ...)
#   MPIRUN_ARGS       extra mpirun options (e.g. "--mca btl_tcp_if_include ib0")

HVD_BACKUP_ROOT=${HVD_BACKUP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
VENV=${VENV:-$HVD_BACKUP_ROOT/.venv}
LAUNCHER=${LAUNCHER:-srun}
EXIT_PREEMPTED=3  # hvd-backup-train: stopped on SIGUSR1 after writing a checkpoint

hvd_backup_banner() {
  echo "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES:-1} node(s)," \
       "${SLURM_NTASKS:-1} ranks, launcher $LAUNCHER, on $(hostname) at $(date -Is)"
}

# One rank per GPU; Horovod's NCCL build reduces on the GPUs. These are the usual knobs, overridable.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export HOROVOD_CYCLE_TIME=${HOROVOD_CYCLE_TIME:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

hvd_backup_launch() {
  # Run the trainer on every task of the allocation: hvd_backup_launch [trainer flags...]
  local python="$VENV/bin/python"
  [ -x "$python" ] || { echo "slurm: no $python: run 'make setup GPU=1' in $HVD_BACKUP_ROOT first" >&2; return 2; }
  local cmd=("$python" -m hvd_backup.train "$@")
  case "$LAUNCHER" in
    srun)
      local mpi=${SRUN_MPI:-}
      if [ -z "$mpi" ]; then
        if srun --mpi=list 2>&1 | grep -q pmix; then mpi=pmix; else mpi=pmi2; fi
      fi
      srun --mpi="$mpi" --kill-on-bad-exit=0 "${cmd[@]}" & ;;
    mpirun)
      local root=()
      [ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
      # A lost link between nodes: Open MPI's runtime notices only through TCP keepalives, by default after 8
      # minutes (300 s + 9 x 20 s), and never if its last message is unacknowledged. These end the whole job
      # about 40 s after a partition; keep them well under --hang-timeout, or mpirun may outlive the ranks.
      export OMPI_MCA_oob_tcp_keepalive_time=${OMPI_MCA_oob_tcp_keepalive_time:-20}
      export OMPI_MCA_oob_tcp_keepalive_intvl=${OMPI_MCA_oob_tcp_keepalive_intvl:-5}
      export OMPI_MCA_oob_tcp_keepalive_probes=${OMPI_MCA_oob_tcp_keepalive_probes:-4}
      # shellcheck disable=SC2086
      mpirun "${root[@]}" -np "${SLURM_NTASKS:-1}" --bind-to none $MPIRUN_ARGS "${cmd[@]}" & ;;
    *) echo "slurm: LAUNCHER=$LAUNCHER: use srun or mpirun" >&2; return 2 ;;
  esac
  local pid=$! preempted=0 code
  # Slurm's --signal=B:USR1@T reaches this shell; pass it on: every rank stops after the same step and rank 0
  # writes a checkpoint (exit code 3). srun and mpirun both forward SIGUSR1 to the ranks.
  trap 'preempted=1; echo "slurm: SIGUSR1 (time limit or preemption): asking the ranks to checkpoint"; kill -USR1 $pid' USR1
  while true; do
    wait "$pid"
    code=$?
    kill -0 "$pid" 2>/dev/null || break  # wait returned because of the trap, not because the job ended
  done
  trap - USR1
  if [ "$code" = "$EXIT_PREEMPTED" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "slurm: checkpoint written; requeueing job $SLURM_JOB_ID to resume from it"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  [ "$preempted" = 1 ] && [ "$code" != 0 ] && echo "slurm: the job ended with code $code after the signal" >&2
  return "$code"
}
