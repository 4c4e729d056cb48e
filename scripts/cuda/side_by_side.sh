#!/usr/bin/env bash
# The whole CUDA comparison of BENCHMARKS.md in one lease of the GPU machine (device time is
# scarce): llama.cpp builds in the background (~5 minutes on 16 cores) while moestream's kernel
# tests and benchmark run; then the CLI GPU tests, then llama.cpp's benchmark on the same file.
#   scripts/cuda/side_by_side.sh            (logs under $OUT, default /tmp/side_by_side)
# Carries: .device/ from scripts/cuda/pack.sh and scripts/cuda/slim_llamacpp.sh, and
# .device/with-memory-limit (a copy of ../shared/tools/with-memory-limit). If the kernel tests
# fail and .device/prev/moestream.xz exists (an earlier, tested build), that binary is measured.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
O=${OUT:-/tmp/side_by_side}
mkdir -p "$O"
# shellcheck source=/dev/null
source "$ROOT/scripts/cuda/device_env.sh" > "$O/env.log" 2>&1
cd "$ROOT"
export WITH_MEMORY_LIMIT=$ROOT/.device/with-memory-limit
(scripts/cuda/build_llamacpp.sh build > "$O/llama_build.log" 2>&1) &
build=$!
(cd .device && timeout 120 ./kernels --nocapture > "$O/kernels.log" 2>&1)
if [ $? -ne 0 ] && [ -f .device/prev/moestream.xz ]; then
  xz -dkf .device/prev/moestream.xz && chmod +x .device/prev/moestream
  export MOESTREAM_BIN=$ROOT/.device/prev/moestream
  echo "kernel tests failed: measuring .device/prev/moestream" | tee -a "$O/kernels.log"
fi
timeout 360 scripts/cuda/bench.sh a b b-lfu c > "$O/moestream.log" 2>&1
(cd .device && timeout 150 ./clitests cuda:: --nocapture > "$O/clitests.log" 2>&1)
wait $build
timeout 240 scripts/cuda/build_llamacpp.sh a b c > "$O/llamacpp.log" 2>&1
grep -h "test result\|failed\|pp512\|tg128\|hit rate\|built in\|limit=" "$O"/*.log
