#!/usr/bin/env bash
# The CUDA comparison of BENCHMARKS.md in one device call (at most 10 minutes; device time is
# scarce): llama.cpp builds in the background (~5-6 minutes on 16 cores) while the benchmark file
# is written and moestream's GPU tests run; then the two engines take turns on the same file:
# llama.cpp (a), moestream (a), llama.cpp (b), moestream (b), and moestream (c) if time is left.
#   scripts/cuda/side_by_side.sh            (logs under $OUT, default /tmp/side_by_side)
# Carries: .device/ from scripts/cuda/pack.sh and scripts/cuda/slim_llamacpp.sh, and
# .device/with-memory-limit (a copy of ../shared/tools/with-memory-limit).
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
scripts/cuda/bench.sh synth > "$O/synth.log" 2>&1
(cd .device && timeout 120 ./kernels --nocapture > "$O/kernels.log" 2>&1)
(cd .device && timeout 200 ./clitests cuda:: --nocapture > "$O/clitests.log" 2>&1)
wait $build
for what in a b; do
  timeout 90 scripts/cuda/build_llamacpp.sh "$what" >> "$O/llamacpp.log" 2>&1
  timeout 120 scripts/cuda/bench.sh "$what" >> "$O/moestream.log" 2>&1
done
# (c) only if the call has the time (SECONDS counts from the start of this script).
[ "$SECONDS" -lt 450 ] && timeout 120 scripts/cuda/bench.sh c >> "$O/moestream.log" 2>&1
grep -h "test result\|FAILED\|panicked\|pp512\|tg128\|hit rate\|built in\|int8 decode" "$O"/*.log
