#!/usr/bin/env bash
# Install the pinned CUDA 13.0 toolchain from PyPI wheels (no GPU, no root CUDA needed) and write an env
# file that `scripts/build-cuda.sh` sources. Idempotent. See ../shared/gpu-build.md for why each step.
#   usage: scripts/cuda-toolchain.sh [PREFIX]      (default: .toolchain/cuda in the repo)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-$repo/.toolchain/cuda}
cuda=$prefix/nvidia/cu13
if [ ! -x "$cuda/bin/nvcc" ]; then
  # 13.0.x only: PTX from nvcc 13.1+ does not load on the GPU machine's CUDA 13.0 (580) driver.
  python3 -m pip install -q --no-deps --target "$prefix" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
# NCCL for multi-GPU data parallelism (`--features nccl`): linked here, the GPU machine's own
# libnccl.so.2 (PyTorch's wheel) at run time; its ABI is stable across 2.x.
# (Its own --target: pip does not merge a wheel into an existing nvidia/ directory.)
nccl=$prefix/nccl/nvidia/nccl/lib
if [ ! -e "$nccl/libnccl.so.2" ]; then
  python3 -m pip install -q --no-deps --target "$prefix/nccl" nvidia-nccl-cu13==2.27.7
fi
[ -e "$nccl/libnccl.so" ] || ln -s libnccl.so.2 "$nccl/libnccl.so"
lib=$cuda/lib
# The wheels ship only versioned sonames; the linker wants the plain names.
for l in libcublas libcublasLt libnvrtc libcudart; do
  [ -e "$lib/$l.so" ] || ln -s "$l.so.13" "$lib/$l.so"
done
[ -e "$lib/libcurand.so" ] || ln -s libcurand.so.10 "$lib/libcurand.so"
# No wheel carries the driver: link against a stub libcuda.so.1 that defines every cu* entry point of
# cuda.h; at run time the GPU machine's real driver library is loaded instead.
if [ ! -e "$lib/stubs/libcuda.so" ]; then
  mkdir -p "$lib/stubs"
  gcc -E -P -I"$cuda/include" "$cuda/include/cuda.h" 2>/dev/null |
    grep -oE 'CUresult (CUDAAPI )?cu[A-Za-z0-9_]+ *\(' | sed -E 's/CUresult (CUDAAPI )?//; s/ *\($//' |
    sort -u | awk '{print "int " $1 "(void){return 999;}"}' > "$lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/cuda_stub.c"
  ln -sf libcuda.so "$lib/stubs/libcuda.so.1"
fi
cat > "$prefix/env.sh" <<ENV
export CUDA_HOME=$cuda
export CUDA_PATH=$cuda
export PATH=$cuda/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$lib:$lib/stubs:$nccl:\${LIBRARY_PATH:-}
export LD_LIBRARY_PATH=$lib:$lib/stubs:$nccl:\${LD_LIBRARY_PATH:-}
ENV
echo "CUDA toolchain ready: source $prefix/env.sh"
