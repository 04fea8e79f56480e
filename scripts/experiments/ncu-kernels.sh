#!/usr/bin/env bash
# GPU time per kernel of `proxqat bench` under Nsight Compute: one warm-up and one profiled step of one
# micro-batch (global batch = micro-batch), Llama-3.2-1B shape. Prints the kernels by total time.
# usage (on the GPU machine): [MB=4] [GB=MB] [CACHE=none] scripts/experiments/ncu-kernels.sh BIN ASSETS OUT [bench flags]
# (CACHE=none: keep the caches between kernels, as in a real run; ncu's default flushes them first.)
set -uo pipefail
bin=$1; assets=$2; out=$3; shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC1091
source "$here/device-env.sh"
mkdir -p "$out"
# --clock-control none: the GPU's own clocks (ncu's default locks them at base, which read the GEMMs
# ~25 % slower than they run).
/usr/local/cuda/bin/ncu --clock-control none --cache-control ${CACHE:-all} --metrics gpu__time_duration.sum --csv --print-units base \
  "$bin" bench --tokenizer "$assets/llama3.2-tokenizer.json" --micro-batch ${MB:-4} --global-batch ${GB:-${MB:-4}} --steps 0 "$@" \
  > "$out/ncu.csv" 2> "$out/ncu.err" || { tail -5 "$out/ncu.err"; exit 1; }
python3 - "$out/ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, rows = rows[0], rows[1:]
name, value = head.index("Kernel Name"), head.index("Metric Value")
total = collections.defaultdict(float); calls = collections.Counter()
for r in rows:
    k = r[name].split("(")[0][:70]
    total[k] += float(r[value].replace(",", "")) / 1e6; calls[k] += 1
all_ms = sum(total.values())
print(f"{'ms':>9} {'share':>6} {'calls':>6}  kernel   (warm-up step + profiled step, random init included)")
for k, ms in sorted(total.items(), key=lambda x: -x[1])[:40]:
    print(f"{ms:>9.2f} {100 * ms / all_ms:>5.1f}% {calls[k]:>6}  {k}")
print(f"{all_ms:>9.2f} total, {sum(calls.values())} kernels")
PY
