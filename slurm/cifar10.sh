#!/usr/bin/env bash
#SBATCH --job-name=hvd-backup-cifar10
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
# ResNet-18 on CIFAR-10 on one node with backup workers:
#   DATA_DIR=/datasets/cifar10 sbatch slurm/cifar10.sh [more hvd-backup-train flags]
DATA_DIR=${DATA_DIR:-data/cifar10}
ARCH=${ARCH:-cifar_resnet18}
BATCH_SIZE=${BATCH_SIZE:-128}
EPOCHS=${EPOCHS:-30}
BACKUP_WORKERS=${BACKUP_WORKERS:-1}
STRAGGLER_TIMEOUT=${STRAGGLER_TIMEOUT:-}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/${SLURM_JOB_NAME:-cifar10}}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-500}
METRICS=${METRICS:-logs/${SLURM_JOB_NAME:-cifar10}-${SLURM_JOB_ID:-local}.jsonl}

source "${HVD_BACKUP_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
hvd_backup_banner
hvd_backup_launch --dataset cifar10 --data "$DATA_DIR" --arch "$ARCH" -b "$BATCH_SIZE" --epochs "$EPOCHS" \
  --workers "${SLURM_CPUS_PER_TASK:-4}" --amp --backup-workers "$BACKUP_WORKERS" \
  ${STRAGGLER_TIMEOUT:+--straggler-timeout "$STRAGGLER_TIMEOUT"} \
  --checkpoint-dir "$CHECKPOINT_DIR" --checkpoint-every "$CHECKPOINT_EVERY" --resume \
  --eval-every 1000 --print-freq 50 --metrics "$METRICS" "$@"
