#!/usr/bin/env bash
# Decode and prefill speed of moestream beside llama.cpp (llama-cpp-python 0.3.36, which builds
# its bundled llama.cpp) on the same Q4_K_M GGUF file, same prompt ids, same threads, in one run:
# fully in memory, then under memory caps (the cap holds the process and its page cache).
# Usage: scripts/bench/vs_llamacpp.sh [FILE.gguf] [CAPS]
#   FILE defaults to /work/bench/q3-30b-q4km.gguf, written first if missing with
#   moestream synth --arch qwen3_moe --preset qwen3-30b-a3b --format gguf-q4km --seed 0 FILE (~17 GB)
#   CAPS defaults to "8G 4G"; "" runs in memory only. Environment: BIN (moestream binary), THREADS (2), P (32), N (32),
#   R (2), LLAMA_TIMEOUT (seconds per capped llama.cpp run, 600), MOE_TIMEOUT (600),
#   LLAMA_CAPPED_N (decode steps of the capped --no-repack llama.cpp runs, 8).
# Needs: pip install llama-cpp-python==0.3.36; root, for ../shared/tools/with-memory-limit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=${1:-/work/bench/q3-30b-q4km.gguf}
caps=${2-8G 4G}
bin=${BIN:-target/release/moestream}
t=${THREADS:-2}
p=${P:-32}
n=${N:-32}
r=${R:-2}
wml=${WML:-$here/../../../shared/tools/with-memory-limit}
[[ -x $wml ]] || wml=/work/shared/tools/with-memory-limit
if [[ ! -f $model ]]; then
  free_gb=$(df -BG --output=avail "$(dirname "$model")" | tail -1 | tr -dc 0-9)
  if (( free_gb < 24 )); then
    echo "only ${free_gb} GB free beside $model: the file takes ~17 GB; not writing it" >&2
    exit 1
  fi
  echo "== writing $model"
  "$bin" synth --arch qwen3_moe --preset qwen3-30b-a3b --format gguf-q4km --seed 0 "$model"
fi
echo "== machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo),$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2); $(date -u +%FT%TZ)"
echo "== model: $model ($(du -h "$model" | cut -f1)); threads $t; pp$p, tg$n, $r timed runs after a warm-up"
echo "== moestream $(git rev-parse --short HEAD 2>/dev/null || echo '?'), llama-cpp-python $(python3 -c 'import llama_cpp; print(llama_cpp.__version__)')"
moe() { "$bin" bench --model "$model" -t "$t" -p "$p" -n "$n" -r "$r" --no-bandwidth "$@"; }
lcpp() { python3 "$here/llamacpp_timing.py" "$model" -t "$t" -p "$p" -n "$n" -r "$r" "$@"; }

echo "== in memory: page cache warmed by reading the file once"
cat "$model" >/dev/null
echo "-- moestream (memory-mapped, int8 activations: the default)"
moe --stream-experts off
echo "-- moestream, int16 decode activations (f32 prefill: the default before int8)"
moe --stream-experts off --decode-activations int16
echo "-- llama.cpp (memory-mapped)"
lcpp
echo "-- moestream again (alternating, for the noise)"
moe --stream-experts off
echo "-- llama.cpp again"
lcpp
echo "-- llama.cpp --no-repack (Q4_K tensors used in place in the mapping, as under the caps)"
lcpp --no-repack

for cap in $caps; do
  echo "== under a $cap cap (cold page cache: --drop-caches)"
  echo "-- moestream (experts streamed: the default when the model does not fit)"
  timeout "${MOE_TIMEOUT:-600}" "$wml" "$cap" --drop-caches -- "$bin" bench --model "$model" -t "$t" \
    -p "$p" -n "$n" -r 1 --no-bandwidth || echo "moestream: exit $? (timeout 124)"
  echo "-- llama.cpp (memory-mapped, its default: Q4_K tensors repacked into anonymous memory)"
  timeout "${LLAMA_TIMEOUT:-600}" "$wml" "$cap" --drop-caches -- \
    python3 "$here/llamacpp_timing.py" "$model" -t "$t" -p "$p" -n "$n" -r 1 || echo "llama.cpp: exit $? (timeout 124)"
  echo "-- llama.cpp --no-repack (computes on the mapping; tg${LLAMA_CAPPED_N:-8}: it is slow here)"
  timeout "${LLAMA_TIMEOUT:-600}" "$wml" "$cap" --drop-caches -- \
    python3 "$here/llamacpp_timing.py" "$model" --no-repack -t "$t" -p "$p" -n "${LLAMA_CAPPED_N:-8}" -r 1 \
    || echo "llama.cpp: exit $? (timeout 124)"
done
