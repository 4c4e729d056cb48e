#!/usr/bin/env bash
# Speculative decoding (issue 6): decode tok/s without and with speculation, from the same
# prompt in the same process (`bench` rows `tgN` and `tgN spec`), for drafts of high and low
# acceptance, (a) with the target in memory and (b) with a MoE target streaming its experts
# under a memory cap. Each configuration runs ROUNDS times (alternating with the others) so that
# a noisy machine shows in the spread.
#
#   scripts/bench/speculation.sh            # models under $BENCH_DIR (default /work/bench)
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${B:-target/release/moestream}
D=${BENCH_DIR:-/work/bench}
N=${GEN_TOKENS:-48}
ROUNDS=${ROUNDS:-2}
CAP=${CAP:-8G}
mkdir -p "$D"
synth() { # arch preset format seed name
  [ -f "$D/$5/config.json" ] || "$B" synth --arch "$1" --preset "$2" --format "$3" --seed "$4" "$D/$5"
}
synth qwen3 qwen3-4b hf-bf16 3 q3-4b-bf16
synth qwen3 qwen3-4b-untied hf-bf16 3 q3-4b-untied-bf16
synth qwen3 qwen3-4b-untied mlx4 3 q3-4b-untied-mlx4
synth qwen3 qwen3-0.6b mlx4 5 q3-0.6b-mlx4-other
synth qwen3_moe qwen3-30b-a3b mlx4 0 q3-30b-mlx4

bench() { # label, target, extra...
  local label=$1 target=$2; shift 2
  echo "### $label"
  "$B" bench --model "$D/$target" -p 16 -n "$N" -r "${REPS:-2}" --no-bandwidth "$@" 2>&1 | grep "| tg"
}
for round in $(seq "$ROUNDS"); do
  echo "## round $round ($(date -u +%H:%M:%S))"
  # (a) in memory, dense bf16 targets.
  bench "tied 4B, 0.6B draft of another seed" q3-4b-bf16 --draft-model "$D/q3-0.6b-mlx4-other"
  bench "tied 4B, prompt lookup" q3-4b-bf16 --prompt-lookup
  bench "untied 4B, its own weights at 4 bits" q3-4b-untied-bf16 --draft-model "$D/q3-4b-untied-mlx4"
  bench "untied 4B, its own weights at 4 bits, fixed 4" q3-4b-untied-bf16 --draft-model "$D/q3-4b-untied-mlx4" --fixed-draft-length
  bench "untied 4B, 0.6B draft of another seed" q3-4b-untied-bf16 --draft-model "$D/q3-0.6b-mlx4-other"
  bench "untied 4B, prompt lookup" q3-4b-untied-bf16 --prompt-lookup
  # (b) the 30B MoE streaming its experts under a memory cap.
  for d in "--prompt-lookup" "--draft-model $D/q3-0.6b-mlx4-other" "--prompt-lookup --fixed-draft-length"; do
    echo "### 30B MoE under $CAP, $d"
    # shellcheck disable=SC2086
    ../shared/tools/with-memory-limit "$CAP" -- "$B" bench --model "$D/q3-30b-mlx4" -p 16 -n "$N" -r "${REPS:-2}" \
      --no-bandwidth --stream-experts on $d 2>&1 | grep -E "\| tg|peak|disk" || true
  done
done
