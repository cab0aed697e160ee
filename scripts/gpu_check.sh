#!/usr/bin/env bash
# A check of the GPU path on one GPU machine: the trainer on synthetic ImageNet-sized data (224x224, 1000
# classes) with this project's optimizer, through the pure-MPI backend and, when Horovod is importable, through
# Horovod (NCCL) beside hvd.DistributedOptimizer. Prints one summary line per run; metrics go to $1.
#
#   bash scripts/gpu_check.sh OUTDIR            # PY (default python3) must have torch, mpi4py and this repo
#
# SKIP_MPI=1 / SKIP_HOROVOD=1 leave out the pure-MPI / the Horovod runs.
# Several ranks share the one GPU in the straggler runs (pure-MPI backend: NCCL allows one rank per GPU).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$out"
py=${PY:-python3}
mpirun=(mpirun --bind-to none ${MPIRUN_ARGS:-})
[ "$(id -u)" = 0 ] && mpirun+=(--allow-run-as-root)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=${STEPS:-60}

train() {  # train NAME NP ARGS...: one trainer job, bounded; a failure is reported and the next run goes on
  local name=$1 np=$2; shift 2
  echo "== $name: np=$np $*"
  local t0=$SECONDS
  timeout -k 10 "${RUN_TIMEOUT:-150}" "${mpirun[@]}" -np "$np" -x PYTHONPATH -x PYTHONUNBUFFERED \
    "$py" -m hvd_backup.train --dataset synthetic --image-size "${IMAGE:-224}" --num-classes 1000 --eval-every 0 \
    --print-freq 20 --metrics "$out/$name.jsonl" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  "$py" - "$out/$name.jsonl" "$name" <<'EOF'
import json, statistics, sys
path, name = sys.argv[1], sys.argv[2]
try:
    recs = [json.loads(line) for line in open(path)]
except OSError:
    sys.exit(print(f"SUMMARY {name}: no metrics"))
steps = [r for r in recs if r.get("type") == "step" and r["step"] > 10]
if not steps:
    sys.exit(print(f"SUMMARY {name}: no steps after warm-up"))
med = statistics.median(r["step_s"] for r in steps)
wall = statistics.median(b["time"] - a["time"] for a, b in zip(steps, steps[1:])) if len(steps) > 1 else med
counts = [r["count"] for r in steps]
dropped = {}
for r in steps:
    for d in r["dropped"]:
        dropped[d] = dropped.get(d, 0) + 1
print(f"SUMMARY {name}: {len(steps)} steps after warm-up, median step {1e3 * med:.1f} ms, "
      f"median wall per step {1e3 * wall:.1f} ms, mean included {statistics.mean(counts):.2f}/{steps[0]['size']}, dropped per rank {dropped}")
EOF
}

echo "== machine"
nvidia-smi -L
"$py" -c "import torch, mpi4py; from mpi4py import MPI; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0)); print('mpi4py', mpi4py.__version__, MPI.Get_library_version().split(chr(0))[0].splitlines()[0])"

if [ -z "${SKIP_MPI:-}" ]; then
# One rank: the trainer on the GPU (bf16 autocast), this project's optimizer with b=0, no Horovod.
train r50-mpi-n1 1 --backend mpi --arch resnet50 -b 128 --amp --channels-last --backup-workers 0 --steps "$steps" -j 10
# Four ranks on the one GPU, rank 3 slowed by 0.2 s per step: plain sync (b=0) against one backup worker.
for b in 0 1; do
  train r18-mpi-n4-b$b 4 --backend mpi --arch resnet18 -b 64 --amp --channels-last --backup-workers $b --steps "$steps" -j 3 \
    --straggler fixed:delay=0.2,rank=3
done
fi
if [ -n "${SKIP_HOROVOD:-}" ]; then :
elif "$py" -c "import horovod.torch" 2>/dev/null; then
  horovodrun --check-build
  # Horovod (NCCL) on one rank: this project's optimizer against hvd.DistributedOptimizer, same job otherwise
  # (contiguous memory: Horovod's own optimizer cannot take channels-last gradients), then channels-last.
  train r50-hvd-n1-backup 1 --backend horovod --arch resnet50 -b 128 --amp --backup-workers 0 --steps "$steps" -j 10
  train r50-hvd-n1-sync 1 --backend horovod --mode sync --arch resnet50 -b 128 --amp --steps "$steps" -j 10
  train r50-hvd-n1-backup-cl 1 --backend horovod --arch resnet50 -b 128 --amp --channels-last --backup-workers 0 \
    --steps "$steps" -j 10
else
  echo "== Horovod is not importable: the Horovod runs are skipped"
fi
