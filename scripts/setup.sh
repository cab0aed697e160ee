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

# 2. The virtual environment, with the pinned torch/torchvision, this package, and an mpi4py that uses this MPI.
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$python is older than Python 3.10"
[ -x "$venv/bin/python" ] || { say "creating $venv"; "$python" -m venv "$venv"; }
py="$venv/bin/python"
if ! "$py" -c 'import hvd_backup, mpi4py, torch, torchvision, tqdm, pytest, matplotlib, sklearn' >/dev/null 2>&1; then
  say "installing torch, mpi4py and hvd_backup into $venv"
  "$py" -m pip install -q -e "$here[test,plots]"
else
  "$py" -m pip install -q --no-deps -e "$here"  # refresh entry points after a change to pyproject.toml
fi
# mpi4py's wheel loads the MPI library found at run time (Open MPI and MPICH ABIs). Compile it with this MPI's
# mpicc when asked (MPI4PY_FROM_SOURCE=1) or when the wheel does not pick up the MPI on PATH (4 minutes here).
vendor=$(mpirun --version 2>/dev/null | head -n 1 | sed -E 's/^[^(]*\(([^)]*)\).*/\1/')
if [ "${MPI4PY_FROM_SOURCE:-0}" = 1 ] \
   || ! "$py" -c 'import sys; from mpi4py import MPI; sys.exit(sys.argv[1] not in MPI.Get_library_version())' "$vendor" 2>/dev/null; then
  # The wheel carries one extension per MPI ABI (MPI.mpich*.so, MPI.openmpi*.so); a compiled one has one.
  if "$py" -c 'import glob, os, sys, mpi4py; sys.exit(not glob.glob(os.path.dirname(mpi4py.__file__) + "/MPI.mpich*"))'; then
    say "compiling mpi4py with $(command -v mpicc)"
    MPICC=$(command -v mpicc) "$py" -m pip install -q --force-reinstall --no-deps --no-binary mpi4py "mpi4py>=4"
  fi
fi

# 3. Horovod, built for this torch (see build_horovod.sh for why it is not a plain dependency).
want_nccl=${GPU:-0}
if ! "$py" -c 'import horovod.torch' >/dev/null 2>&1 \
   || { [ "$want_nccl" = 1 ] && ! "$venv/bin/horovodrun" --check-build | grep -q '\[X\] NCCL'; }; then
  say "building Horovod (a few minutes)"
  "$py" -m pip install -q cffi cloudpickle psutil pyyaml packaging cmake
  GPU=$want_nccl bash "$here/scripts/build_horovod.sh" "$venv"
fi

# 4. Verify.
check=$("$venv/bin/horovodrun" --check-build)
echo "$check" | grep -q '\[X\] PyTorch' || die "Horovod was built without PyTorch support: $check"
echo "$check" | grep -q '\[X\] MPI' || die "Horovod was built without MPI support: $check"
say "ready: $("$py" -c 'import torch, horovod, mpi4py; from mpi4py import MPI; print(f"torch {torch.__version__}, horovod {horovod.__version__}, mpi4py {mpi4py.__version__}, {MPI.Get_library_version().split(chr(0))[0].splitlines()[0]}")')"
