#!/usr/bin/env bash
# Builds the CUDA binaries here (no CUDA needed) and packs them into .device/ (git-ignored) for
# the GPU machine: the release binary, the CUDA kernel tests and the CLI integration tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --features cuda
out=$(cargo test --release --features cuda -p moestream -p moestream-cuda --no-run --message-format=json)
exe() { echo "$out" | python3 -c "import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m.get('executable') and m['target']['name']=='$1': print(m['executable'])"; }
mkdir -p .device
cp target/release/moestream .device/moestream
cp "$(exe kernels)" .device/kernels
cp "$(exe tests)" .device/clitests
strip .device/moestream .device/kernels .device/clitests
xz -T2 -6 -f .device/moestream .device/kernels .device/clitests
ls -la .device
