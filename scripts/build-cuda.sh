#!/usr/bin/env bash
# Build the stripped `--features cuda,nccl` release binary with the pinned PyPI CUDA toolchain.
#   usage: scripts/build-cuda.sh [--check]     (--check: `cargo check --features cuda,nccl`, what CI runs)
# Output: target/cuda/release/proxqat (built here, run on the GPU machine: see README "GPU").
# PROXQAT_CUDA_PREFIX (toolchain) and PROXQAT_CUDA_TARGET (cargo target dir) may point at a cache:
# a cold build spends ~15 minutes in nvcc compiling candle's kernels on 2 cores.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
prefix=${PROXQAT_CUDA_PREFIX:-$repo/.toolchain/cuda}
bash scripts/cuda-toolchain.sh "$prefix" >&2
# shellcheck disable=SC1091
source "$prefix/env.sh"
export CARGO_TARGET_DIR=${PROXQAT_CUDA_TARGET:-$repo/target/cuda}
if [ "${1:-}" = "--check" ]; then
  exec cargo check --features cuda,nccl --all-targets
fi
cargo build --release --features cuda,nccl --bins
ls -la "$CARGO_TARGET_DIR/release/proxqat"
