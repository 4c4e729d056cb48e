#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (kernels, formats, models against committed
# transformers/mlx-lm references, tokenizer and chat templates, bad input), then fresh random models
# built by mlx-lm checked against the release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
cargo test --release --workspace --locked
if [ -f scripts/reference/check_fresh_mlx.py ]; then
  if python3 -c "import mlx.core, mlx_lm" 2>/dev/null; then
    python3 scripts/reference/check_fresh_mlx.py --bin target/release/moestream
  elif [ "${CI:-}" = "true" ]; then
    echo "mlx-lm is not installed: the fresh-model check cannot run" >&2
    exit 1
  else
    echo "note: mlx-lm not installed (pip install mlx 'mlx[cpu]' mlx-lm); skipping the fresh-model check" >&2
  fi
fi
# The CUDA backend builds without CUDA installed (its GPU tests run on a GPU machine:
# scripts/cuda/device_tests.sh); last, so the binary above served every check.
cargo build --release --locked --features cuda
