#!/usr/bin/env bash
# Decode and prefill speed of moestream beside mlx-lm on the same MLX checkpoint, in one run.
# Usage: scripts/bench/vs_mlx.sh MODEL_DIR [MLX_PROMPT_TOKENS] [MLX_DECODE_STEPS]
# The model: moestream synth --arch qwen3_moe --preset qwen3-30b-a3b --format mlx4 --seed 0 DIR
set -euo pipefail
model=${1:?model folder}
mp=${2:-4}
mn=${3:-3}
bin=${BIN:-target/release/moestream}
echo "== machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo),$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "== moestream $(git rev-parse --short HEAD 2>/dev/null || echo '?'): warm-up pass (fills the page cache)"
"$bin" bench --model "$model" -p 8 -n 2 -r 0 >/dev/null
echo "== moestream, exact f32 activations (MOESTREAM_EXACT_MATMUL=1)"
MOESTREAM_EXACT_MATMUL=1 "$bin" bench --model "$model" -p 32,128 -n 16 -r 2
echo "== moestream, default kernels"
"$bin" bench --model "$model" -p 32,128 -n 16 -r 2
echo "== mlx-lm $(python3 -c 'import mlx_lm; print(mlx_lm.__version__)'): its model forward, step by step"
python3 "$(dirname "$0")/mlx_decode_steps.py" "$model" "$mp" "$mn"
