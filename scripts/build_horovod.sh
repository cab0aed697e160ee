#!/usr/bin/env bash
# Build Horovod 0.28.1 (the last release) from its PyPI sdist into the virtual environment given as $1.
#
# Why this script exists: Horovod 0.28.1 predates torch 2.1. Its CMake pins C++14 (torch >= 2.1 headers need
# C++17, torch 2.14 needs C++20) and builds its CUDA kernels as C++11 (nvcc 13 accepts C++17 at the least).
# We raise those three standards in the unpacked sdist and build with pip --no-build-isolation, so the
# extension is compiled against the torch in the venv. Delete this script once a Horovod release supports
# torch >= 2.1 and `pip install horovod` works again.
#
# HOROVOD_SDIST=path/to/horovod-0.28.1.tar.gz builds from that file instead of downloading it (offline nodes).
# Environment: GPU=1 adds NCCL operations (NCCL from $HOROVOD_NCCL_HOME, else the nvidia-nccl wheel that
# torch's CUDA build brings; needs nvcc, i.e. a CUDA toolkit or module). MAKEFLAGS defaults to -j$(nproc).
set -euo pipefail
venv=${1:?usage: build_horovod.sh VENV}
version=0.28.1
py="$venv/bin/python"
work=$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [ -n "${HOROVOD_SDIST:-}" ]; then
  cp "$HOROVOD_SDIST" "$work/horovod-$version.tar.gz"
else
  "$py" -m pip download -q --no-deps --no-binary :all: "horovod==$version" -d "$work"
fi
tar -xzf "$work/horovod-$version.tar.gz" -C "$work"
src="$work/horovod-$version"

# The build fix, all of it: raise the C++ standards.
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$src/horovod/common/ops/cuda/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 20' "$src/horovod/torch/CMakeLists.txt" || { echo "build_horovod.sh: the C++ standard patch no longer applies" >&2; exit 1; }
if [ "${GPU:-0}" != 1 ]; then
  # CPU build: do not compile CUDA kernels just because torch is a CUDA build (saves minutes, needs no nvcc).
  sed -i 's/^string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)$/&\nset(Pytorch_CUDA FALSE)/' "$src/cmake/Modules/FindPytorch.cmake"
  grep -q '^set(Pytorch_CUDA FALSE)' "$src/cmake/Modules/FindPytorch.cmake" || { echo "build_horovod.sh: the CPU-only patch no longer applies" >&2; exit 1; }
fi

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
# GCC >= 13 no longer includes <string> and <cstdint> through other standard headers; some of Horovod's do rely
# on that (group_table.h first), so include both everywhere.
export CXXFLAGS="${CXXFLAGS:-} -include string -include cstdint"
# CMake >= 4 refuses the cmake_minimum_required(< 3.5) of Horovod's bundled Gloo unless told this.
export CMAKE_POLICY_VERSION_MINIMUM=${CMAKE_POLICY_VERSION_MINIMUM:-3.5}
# torch looks for CUDA beside `nvcc`; a wrapper script on PATH (as /usr/local/bin/nvcc here) hides the toolkit.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -n "${CUDA_HOME:-}" ]; then export HOROVOD_CUDA_HOME=${HOROVOD_CUDA_HOME:-$CUDA_HOME}; fi
if [ "${GPU:-0}" = 1 ]; then
  export HOROVOD_GPU_OPERATIONS=NCCL
  # Kernels for the GPUs of today's clusters (V100 is not in nvcc 13); override with HOROVOD_BUILD_CUDA_CC_LIST.
  export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-75,80,86,89,90}
  if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_LIB:-}" ]; then
    # The NCCL that torch's CUDA wheels bring: it ships libnccl.so.2 only, so link through a libnccl.so.
    nccl=$("$py" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])') \
      || { echo "build_horovod.sh: no NCCL: set HOROVOD_NCCL_HOME (e.g. your cluster's NCCL module)" >&2; exit 1; }
    mkdir -p "$work/nccl/lib"
    ln -s "$nccl/lib/libnccl.so.2" "$work/nccl/lib/libnccl.so"
    # Link it shared, so the process holds one NCCL (torch's), not also a static one found elsewhere.
    export HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$work/nccl/lib" HOROVOD_NCCL_LINK=SHARED
  fi
  echo "build_horovod.sh: GPU build with NCCL from ${HOROVOD_NCCL_HOME:-${HOROVOD_NCCL_INCLUDE%/include}}"
fi
"$py" -m pip install --no-build-isolation --no-deps --no-cache-dir "$src"
