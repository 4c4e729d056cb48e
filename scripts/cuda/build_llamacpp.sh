#!/usr/bin/env bash
# On the GPU machine: builds the slimmed llama.cpp of .device/llamacpp.tar.xz
# (scripts/cuda/slim_llamacpp.sh) with CUDA for Hopper, then runs llama-bench on the benchmark
# file the way scripts/cuda/bench.sh runs moestream:
#   (a) every layer on the GPU (-ngl 99),
#   (b)/(c) every layer on the GPU but the routed experts on the CPU (-ot exps=CPU, as
#       --n-cpu-moe does), host memory plentiful, then capped at 8 GiB with llama.cpp's default mmap.
#   scripts/cuda/build_llamacpp.sh [build] [a] [b] [c]
set -u
M=${MODEL:-/root/bench/q3-30b-q4km.gguf}
LIMIT=${WITH_MEMORY_LIMIT:-../shared/tools/with-memory-limit}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=/root/llama.cpp/build/bin/llama-bench
[ $# -eq 0 ] && set -- build a b c
for what in "$@"; do
  case $what in
    build)
      t=$(date +%s)
      mkdir -p /root && tar -C /root -xJf "$ROOT/.device/llamacpp.tar.xz"
      cmake -S /root/llama.cpp -B /root/llama.cpp/build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=ON >/root/llama-cmake.log 2>&1 \
        || { tail -20 /root/llama-cmake.log; exit 1; }
      cmake --build /root/llama.cpp/build --target llama-bench -j"$(nproc)" >/root/llama-build.log 2>&1 \
        || { tail -30 /root/llama-build.log; exit 1; }
      echo "llama.cpp built in $(( $(date +%s) - t )) s" ;;
    a) echo "== llama.cpp (a) all layers on the GPU"
       "$B" -m "$M" -ngl 99 -p 512 -n 128 -r 3 ;;
    b) echo "== llama.cpp (b) experts on the CPU, host memory plentiful"
       "$B" -m "$M" -ngl 99 -ot "exps=CPU" -p 512 -n 128 -r 3 ;;
    c) echo "== llama.cpp (c) experts on the CPU, host memory capped at 8 GiB"
       sync; echo 3 > /proc/sys/vm/drop_caches
       "$LIMIT" 8G --drop-caches -- "$B" -m "$M" -ngl 99 -ot "exps=CPU" -p 512 -n 128 -r 1 ;;
  esac
done
