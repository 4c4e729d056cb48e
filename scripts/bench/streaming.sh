#!/usr/bin/env bash
# A model larger than memory: moestream streaming its experts under memory caps, beside the same
# model memory-mapped (--stream-experts off) and mlx-lm, with the disk bandwidth measured by fio
# at the read size and queue depth moestream uses, all in one run.
#
# Usage: scripts/bench/streaming.sh MODEL_DIR [CAPS]      (CAPS default "12G 8G 4G"; needs root)
# Environment: MLX_TIMEOUT, MMAP_TIMEOUT (seconds), TOPK_CAPS (caps of the top-k sweep, "8G 4G").
# The model: moestream synth --arch qwen3_moe --preset qwen3-30b-a3b --format mlx4 MODEL_DIR
set -uo pipefail
model=${1:?model folder}
caps=${2:-12G 8G 4G}
bin=${BIN:-target/release/moestream}
here=$(cd "$(dirname "$0")" && pwd)
wml=${WML:-$here/../../../shared/tools/with-memory-limit}
mlx_timeout=${MLX_TIMEOUT:-300}
mmap_timeout=${MMAP_TIMEOUT:-300}
topk_caps=${TOPK_CAPS:-8G 4G}

echo "== machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo),$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2); kernel $(uname -r)"
echo "== moestream $(git rev-parse --short HEAD 2>/dev/null || echo '?'); model $model: $(du -sh "$model" | cut -f1)"

shard=$(ls -S "$model"/*.safetensors | head -1)
echo "== disk: fio random reads of $shard, O_DIRECT, io_uring, 15 s each"
for bs in 768k 48k; do
  for qd in 1 32; do
    printf 'bs=%-5s qd=%-3s ' "$bs" "$qd"
    fio --name=r --filename="$shard" --readonly --rw=randread --bs=$bs --iodepth=$qd \
      --ioengine=io_uring --direct=1 --runtime=15 --time_based --numjobs=1 \
      --output-format=terse --terse-version=3 2>/dev/null |
      awk -F';' '{printf "%.2f GiB/s\n", $7 / 1048576}'
  done
done

echo "== in memory (no cap, warm page cache): the compute floor"
"$bin" bench --model "$model" --stream-experts off -p 32 -n 32 -r 2

for cap in $caps; do
  echo
  echo "== cap $cap: streamed, default (expert cache auto, O_DIRECT, LFU eviction)"
  "$wml" "$cap" --drop-caches -- "$bin" bench --model "$model" --stream-experts on \
    -p 32 -n 32 -r 1 --no-bandwidth
  echo "== cap $cap: streamed, expert cache with LRU eviction (--expert-eviction lru)"
  "$wml" "$cap" --drop-caches -- "$bin" bench --model "$model" --stream-experts on \
    --expert-eviction lru -p 32 -n 32 -r 1 --no-bandwidth
  echo "== cap $cap: streamed, page cache only (--expert-cache 0)"
  "$wml" "$cap" --drop-caches -- "$bin" bench --model "$model" --stream-experts on \
    --expert-cache 0 -p 32 -n 32 -r 1 --no-bandwidth
  echo "== cap $cap: streamed, mapped page cache (--stream-reads map)"
  "$wml" "$cap" --drop-caches -- "$bin" bench --model "$model" --stream-experts on \
    --stream-reads map -p 32 -n 32 -r 1 --no-bandwidth
  echo "== cap $cap: memory-mapped, as llama.cpp does (--stream-experts off; ${mmap_timeout} s limit)"
  "$wml" "$cap" --drop-caches -- timeout "$mmap_timeout" "$bin" bench --model "$model" \
    --stream-experts off -p 8 -n 8 -r 0 --no-warmup --no-bandwidth || echo "(stopped after ${mmap_timeout} s)"
  echo "== cap $cap: mlx-lm $(python3 -c 'import mlx_lm; print(mlx_lm.__version__)' 2>/dev/null) (${mlx_timeout} s limit)"
  "$wml" "$cap" --drop-caches -- timeout "$mlx_timeout" python3 "$here/mlx_decode_steps.py" "$model" 8 2 ||
    echo "(mlx-lm stopped: exit $?)"
done

echo
for cap in $topk_caps; do
  echo "== top-k sweep under $cap (default streaming): speed and KL divergence from top-k 8"
  "$wml" "$cap" --drop-caches -- "$bin" bench --model "$model" --stream-experts on \
    --top-k 8,6,4,2 -p 32 -n 32 -r 1 --no-bandwidth
done
