#!/usr/bin/env bash
# Binaries side by side on one GPU: `proxqat bench` (Llama-3.2-1B shape, global batch 128 × 256) for each
# binary in turn, ROUNDS times, alternating, so that a drift of the machine (clocks, other tenants) falls
# on all of them alike. Prints each binary's mean tokens/s per micro-batch and its ratio to the first
# binary's: the way every gain in BENCHMARKS.md since session 12 was measured. Rows in OUT/bench.jsonl.
# usage (on the GPU machine): [ROUNDS=2] [MBS="16 4"] [METHOD=fp] \
#   scripts/experiments/ab-bench.sh ASSETS OUT NAME=BIN NAME=BIN ...
set -uo pipefail
assets=$1; out=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC1091
source "$here/device-env.sh"
mkdir -p "$out"
for round in $(seq "${ROUNDS:-2}"); do
  for mb in ${MBS:-16 4}; do
    for pair in "$@"; do
      name=${pair%%=*}; bin=${pair#*=}
      timeout 120 "$bin" bench --shape llama-3.2-1b --tokenizer "$assets/llama3.2-tokenizer.json" --micro-batch "$mb" \
        --seq 256 --global-batch 128 --method "${METHOD:-fp}" --steps 2 2>>"$out/bench.log" \
        | sed "s/^{/{\"impl\":\"$name\",\"round\":$round,/" >> "$out/bench.jsonl"
    done
  done
done
python3 - "$out/bench.jsonl" "${@%%=*}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
names = sys.argv[2:]
for mb in sorted({r["micro_batch"] for r in rows}, reverse=True):
    mean = {n: statistics.mean(r["tokens_per_s"] for r in rows if r["impl"] == n and r["micro_batch"] == mb)
            for n in names if any(r["impl"] == n and r["micro_batch"] == mb for r in rows)}
    for n, v in mean.items():
        runs = " / ".join(f"{r['tokens_per_s']:.0f}" for r in rows if r["impl"] == n and r["micro_batch"] == mb)
        peak = max(r["peak_gib"] for r in rows if r["impl"] == n and r["micro_batch"] == mb)
        ratio = v / mean[names[0]] if names[0] in mean else float("nan")
        print(f"mb {mb:>3}  {n:<12} {v:>8.0f} tok/s ({runs})  {ratio - 1:+6.1%} vs {names[0]}  peak {peak:.1f} GiB")
PY
