#!/usr/bin/env bash
# The CUDA benchmark of BENCHMARKS.md, on the GPU machine:
#   source scripts/cuda/device_env.sh; scripts/cuda/bench.sh [a|b|b-lfu|c ...]
# Writes the qwen3-30b-a3b-geometry Q4_K_M file once (random weights), then runs
# (a) every expert in VRAM, (b) a VRAM expert cache of ~25% of the expert bytes with host memory
# plentiful, (c) the same cache with host memory capped at 8 GiB (with-memory-limit).
set -u
M=${MODEL:-/root/bench/q3-30b-q4km.gguf}
BIN=${MOESTREAM_BIN:-target/release/moestream}
LIMIT=${WITH_MEMORY_LIMIT:-../shared/tools/with-memory-limit}
CACHE=${GPU_EXPERT_CACHE:-4G}   # 25% of the 16.0 GiB of routed experts
mkdir -p "$(dirname "$M")"
if [ ! -f "$M" ]; then
  t=$(date +%s)
  "$BIN" synth --arch qwen3_moe --preset qwen3-30b-a3b --format gguf-q4km --seed 1 "$M" || exit 1
  echo "synth: $(( $(date +%s) - t )) s"
fi
B=("$BIN" bench --model "$M" -p 512 -n 128 -r 3 --no-bandwidth)
[ $# -eq 0 ] && set -- a b c
for what in "$@"; do
  case $what in
    a) echo "== (a) all experts in VRAM"; "${B[@]}" --device cuda ;;
    b) echo "== (b) VRAM expert cache $CACHE, host memory plentiful"; "${B[@]}" --device cuda --gpu-expert-cache "$CACHE" ;;
    b-lfu) echo "== (b) with LFU eviction"; "${B[@]}" --device cuda --gpu-expert-cache "$CACHE" --gpu-expert-eviction lfu ;;
    c) echo "== (c) VRAM expert cache $CACHE, host memory capped at 8 GiB"
       sync; echo 3 > /proc/sys/vm/drop_caches
       dd if="$M" of=/dev/null bs=16M count=256 iflag=direct 2>&1 | tail -1
       "$LIMIT" 8G --drop-caches -- "${B[@]}" --device cuda --gpu-expert-cache "$CACHE" ;;
  esac
done
