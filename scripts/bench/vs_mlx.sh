#!/usr/bin/env bash
# Decode and prefill speed of moestream beside mlx-lm on the same MLX checkpoint, in one run.
# Usage: scripts/bench/vs_mlx.sh MODEL_DIR [PROMPT_TOKENS] [GEN_TOKENS]
# Makes the model first if asked: moestream synth --arch qwen3_moe --preset qwen3-30b-a3b --format mlx4 DIR
set -euo pipefail
model=${1:?model folder}
p=${2:-64}
n=${3:-16}
bin=${BIN:-target/release/moestream}
echo "== machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "== moestream bench (page cache warmed by a first pass)"
"$bin" bench --model "$model" -p "$p" -n 4 -r 0 >/dev/null
"$bin" bench --model "$model" -p "$p" -n "$n" -r 2
echo "== mlx-lm $(python3 -c 'import mlx_lm; print(mlx_lm.__version__)') (mlx $(python3 -c 'import mlx.core as mx; print(mx.__version__)')), mlx_lm.generate"
# A prompt of about $p tokens for the synthetic byte-level tokenizer (one token per byte).
prompt=$(python3 -c "print(('the quick brown fox ' * 100)[:$p - 1])")
python3 -m mlx_lm generate --model "$model" --prompt "$prompt" --ignore-chat-template -m "$n" --temp 0 2>&1 | grep -E "Prompt:|Generation:|Peak memory"
