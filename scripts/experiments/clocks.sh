#!/usr/bin/env bash
# SM clock, power and clock-event reasons sampled every 100 ms while (1) the GPU idles, (2) the GEMMs of
# one micro-step run back to back in PyTorch (gemm_sequence.py) and (3) `proxqat bench` runs sustained
# steps; the summary prints each phase's median clock and power and the reasons seen.
# usage (on the GPU machine): [MB=16] scripts/experiments/clocks.sh BIN ASSETS OUT
set -uo pipefail
bin=$1; assets=$2; out=$3
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC1091
source "$here/device-env.sh"
mkdir -p "$out"; mb=${MB:-16}
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
  --format=csv,noheader,nounits -lms 100 > "$out/smi.csv" &
sampler=$!
phase() { echo "$(date +%s.%N) $1" >> "$out/phases.txt"; }
phase idle; sleep 2
phase gemms; python3 "$here/experiments/gemm_sequence.py" $((mb * 256)) 8 | tee "$out/gemm_sequence.json"
phase bench; "$bin" bench --shape llama-3.2-1b --tokenizer "$assets/llama3.2-tokenizer.json" --micro-batch "$mb" \
  --seq 256 --global-batch 128 --method fp --steps 8 2>"$out/bench.log" | tee "$out/bench.json"
phase end; sleep 0.3; kill $sampler
python3 - "$out" <<'PY'
import sys, datetime, statistics
out = sys.argv[1]
phases = [l.split() for l in open(f"{out}/phases.txt")]
rows = []
for l in open(f"{out}/smi.csv"):
    f = [x.strip() for x in l.split(",")]
    try:
        t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        rows.append((t, float(f[1]), float(f[2]), float(f[3]), f[4]))
    except (ValueError, IndexError):
        pass
print(f"{'phase':<7} {'samples':>7} {'SM MHz (median, min)':>21} {'power W (median, max)':>22} {'°C max':>7}  reasons")
for (t0, name), (t1, _) in zip(phases, phases[1:]):
    sel = [r for r in rows if float(t0) <= r[0] < float(t1)]
    if not sel:
        print(f"{name:<7} no samples"); continue
    clk, pw = [r[1] for r in sel], [r[2] for r in sel]
    reasons = sorted({r[4] for r in sel})
    print(f"{name:<7} {len(sel):>7} {statistics.median(clk):>12.0f} {min(clk):>8.0f} {statistics.median(pw):>13.0f} {max(pw):>8.0f} {max(r[3] for r in sel):>7.0f}  {' '.join(reasons)}")
PY
