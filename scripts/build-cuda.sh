#!/usr/bin/env bash
# Build the stripped `--features cuda` release binary with the pinned PyPI CUDA toolchain.
#   usage: scripts/build-cuda.sh [--check]     (--check: `cargo check` only, what CI runs)
# Output: target/cuda/release/proxqat (built here, run on the GPU machine: see README "GPU").
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/cuda-toolchain.sh >&2
# shellcheck disable=SC1091
source .toolchain/cuda/env.sh
export CARGO_TARGET_DIR=$repo/target/cuda
if [ "${1:-}" = "--check" ]; then
  exec cargo check --features cuda --all-targets
fi
cargo build --release --features cuda --bins
ls -la "$CARGO_TARGET_DIR/release/proxqat"
