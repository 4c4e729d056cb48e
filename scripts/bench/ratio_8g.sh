#!/usr/bin/env bash
# Issue 3 target (b): decode under an 8 GiB cap (process + page cache) against moestream's own
# in-memory decode, the two alternating PAIRS times on one file so that the machine's drift shows.
#   scripts/bench/ratio_8g.sh [FILE_OR_DIR] [PAIRS]      (default /work/bench/q3-30b-q4km.gguf, 3)
# In memory: the file read once into the page cache, `--stream-experts off`. Capped: the default
# streaming, cold (`with-memory-limit 8G --drop-caches`). Environment: BIN, THREADS (2), P (32),
# N (64), CAP (8G).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=${1:-/work/bench/q3-30b-q4km.gguf}
pairs=${2:-3}
bin=${BIN:-target/release/moestream}
cap=${CAP:-8G}
wml=$here/../../../shared/tools/with-memory-limit
[[ -x $wml ]] || wml=/work/shared/tools/with-memory-limit
b=("$bin" bench --model "$model" -t "${THREADS:-2}" -p "${P:-32}" -n "${N:-64}" --no-bandwidth)
echo "== $(date -u +%FT%TZ) moestream $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$pairs"); do
  echo "== pair $i: in memory"
  find "$model" -type f -exec cat {} + > /dev/null
  "${b[@]}" -r 2 --stream-experts off | grep -E "\| (pp|tg)"
  echo "== pair $i: $cap cap"
  "$wml" "$cap" --drop-caches -- "${b[@]}" -r 1 | grep -E "\| (pp|tg)|limit="
done
