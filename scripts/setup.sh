#!/usr/bin/env bash
# Set up everything hvd_backup needs, idempotently: MPI, a virtual environment with the pinned PyTorch,
# mpi4py built against that MPI, this package, and Horovod built for this PyTorch.
#   scripts/setup.sh [VENV]       (default .venv; GPU=1 builds Horovod with NCCL)
# On a cluster, load your MPI (and CUDA) modules first: an MPI already on PATH is used as it is.
set -euo pipefail
venv=${1:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 1; }

# 1. MPI: the one on PATH (clusters), else Debian's Open MPI when we may install it.
if ! command -v mpicc >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Open MPI (openmpi-bin libopenmpi-dev)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  else
    die "no MPI on PATH (mpicc, mpirun): install Open MPI (e.g. apt-get install openmpi-bin libopenmpi-dev) or load your cluster's MPI module"
  fi
fi

# 2. The virtual environment, with the pinned torch/torchvision and mpi4py compiled by this MPI's mpicc.
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$python is older than Python 3.10"
[ -x "$venv/bin/python" ] || { say "creating $venv"; "$python" -m venv "$venv"; }
py="$venv/bin/python"
if ! "$py" -c 'import hvd_backup, mpi4py, torch, torchvision, tqdm, pytest, matplotlib, sklearn' >/dev/null 2>&1; then
  say "installing torch, mpi4py (built with $(command -v mpicc)) and hvd_backup into $venv"
  "$py" -m pip install -q --upgrade pip setuptools wheel
  MPICC=$(command -v mpicc) "$py" -m pip install -q --no-binary mpi4py -e "$here[test,plots]"
fi

# 3. Horovod, built for this torch (see build_horovod.sh for why it is not a plain dependency).
want_nccl=${GPU:-0}
if ! "$py" -c 'import horovod.torch' >/dev/null 2>&1 \
   || { [ "$want_nccl" = 1 ] && ! "$venv/bin/horovodrun" --check-build | grep -q '\[X\] NCCL'; }; then
  say "building Horovod (a few minutes)"
  "$py" -m pip install -q cloudpickle psutil pyyaml packaging cmake
  GPU=$want_nccl bash "$here/scripts/build_horovod.sh" "$venv"
fi

# 4. Verify.
check=$("$venv/bin/horovodrun" --check-build)
echo "$check" | grep -q '\[X\] PyTorch' || die "Horovod was built without PyTorch support: $check"
echo "$check" | grep -q '\[X\] MPI' || die "Horovod was built without MPI support: $check"
say "ready: $("$py" -c 'import torch, horovod, mpi4py; from mpi4py import MPI; print(f"torch {torch.__version__}, horovod {horovod.__version__}, mpi4py {mpi4py.__version__}, {MPI.Get_library_version().splitlines()[0]}")')"
