#!/usr/bin/env bash
#SBATCH --job-name=hvd-backup-bench
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out
# The straggler benchmark on real GPUs: plain Horovod against backup workers with b = 0, 1, 2, ..., on
# synthetic ImageNet-sized data, side by side in one allocation; a table at the end.
#   STRAGGLER='exp:mean=0.05' BACKUPS='0 1 2 4' sbatch slurm/bench.sh
ARCH=${ARCH:-resnet50}
BATCH_SIZE=${BATCH_SIZE:-64}
IMAGE_SIZE=${IMAGE_SIZE:-224}
STEPS=${STEPS:-200}
BACKUPS=${BACKUPS:-0 1 2}
STRAGGLER=${STRAGGLER:-none}
OUT=${OUT:-logs/bench-${SLURM_JOB_ID:-local}}

source "${HVD_BACKUP_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
hvd_backup_banner
mkdir -p "$OUT"
common=(--dataset synthetic --image-size "$IMAGE_SIZE" --arch "$ARCH" -b "$BATCH_SIZE" --steps "$STEPS" --amp
        --workers "${SLURM_CPUS_PER_TASK:-4}" --straggler "$STRAGGLER" --print-freq 50)
hvd_backup_launch "${common[@]}" --mode sync --metrics "$OUT/sync.jsonl" "$@"
for b in $BACKUPS; do
  hvd_backup_launch "${common[@]}" --mode backup --backup-workers "$b" --metrics "$OUT/backup-b$b.jsonl" "$@"
done
"$VENV/bin/python" -m hvd_backup.bench.summarize "$OUT"/*.jsonl
