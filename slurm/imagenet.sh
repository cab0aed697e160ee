#!/usr/bin/env bash
#SBATCH --job-name=hvd-backup-imagenet
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
# ResNet-50 on ImageNet with backup workers, one rank per GPU. From the checkout, after `make setup GPU=1`:
#   DATA_DIR=/datasets/imagenet BACKUP_WORKERS=2 sbatch slurm/imagenet.sh [more hvd-backup-train flags]
# It resumes from the newest checkpoint in CHECKPOINT_DIR, and 10 minutes before the time limit (or on
# `scancel --signal=USR1 --batch JOBID`) it checkpoints and requeues itself.
DATA_DIR=${DATA_DIR:-/datasets/imagenet}
ARCH=${ARCH:-resnet50}
BATCH_SIZE=${BATCH_SIZE:-64}
EPOCHS=${EPOCHS:-90}
LR=${LR:-0.1}
BACKUP_WORKERS=${BACKUP_WORKERS:-2}
STRAGGLER_TIMEOUT=${STRAGGLER_TIMEOUT:-}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/${SLURM_JOB_NAME:-imagenet}}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-1000}
METRICS=${METRICS:-logs/${SLURM_JOB_NAME:-imagenet}-${SLURM_JOB_ID:-local}.jsonl}

source "${HVD_BACKUP_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
hvd_backup_banner
hvd_backup_launch --dataset imagenet --data "$DATA_DIR" --arch "$ARCH" -b "$BATCH_SIZE" --epochs "$EPOCHS" \
  --lr "$LR" --warmup-steps 2500 --label-smoothing 0.1 --amp --workers "${SLURM_CPUS_PER_TASK:-8}" \
  --backup-workers "$BACKUP_WORKERS" ${STRAGGLER_TIMEOUT:+--straggler-timeout "$STRAGGLER_TIMEOUT"} \
  --checkpoint-dir "$CHECKPOINT_DIR" --checkpoint-every "$CHECKPOINT_EVERY" --resume \
  --eval-every 5000 --print-freq 100 --metrics "$METRICS" "$@"
