#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run calls this). Installs what it needs itself:
# the real assets (registries only) and a Python venv with the independent references (numpy, gguf,
# tiktoken) that the tests compare against.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/fetch-assets.sh
venv=$repo/.venv-test
if ! "$venv/bin/python" -c "import numpy, gguf, tiktoken" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check numpy gguf tiktoken
fi
export PROXQAT_PYTHON=$venv/bin/python
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
# The CUDA build must not rot: compile everything with --features cuda (no GPU needed). The toolchain and
# target dir live in a cache; a cold run adds ~20 minutes (nvcc over candle's kernels). Skip locally
# with PROXQAT_SKIP_CUDA_CHECK=1.
if [ "${PROXQAT_SKIP_CUDA_CHECK:-0}" != 1 ]; then
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/proxqat
  PROXQAT_CUDA_PREFIX=$cache/cuda-toolchain PROXQAT_CUDA_TARGET=$cache/cuda-target bash scripts/build-cuda.sh --check
fi
