#!/usr/bin/env bash
# Session 15 round 1: (a) q/k/v and gate/up as single GEMMs vs separate, GEMM sequence under the cap;
# (b) algorithms chosen by energy under the cap; (c) SM clock and board power during whole training steps of the current binary (mb 16, 4).
cd "$(dirname "$0")/.."
source scripts/device-env.sh
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
for t in 4096 1024; do LAYOUT=fused python3 scripts/experiments/gemm_algos.py $t 3 8 > $OUT/fused-$t.txt 2>&1; done
CAND_SECONDS=0.3 PICK=energy python3 scripts/experiments/gemm_algos.py 4096 3 12 > $OUT/energy-4096.txt 2>&1
python3 scripts/experiments/overlap_probe.py 4096 4 > $OUT/overlap-4096.txt 2>&1
COPY_MB=300 python3 scripts/experiments/overlap_probe.py 1024 4 > $OUT/overlap-1024.txt 2>&1
xz -dc .carry/proxqat-new.xz > /tmp/proxqat; chmod +x /tmp/proxqat
for mb in 16 4; do
  nvidia-smi --query-gpu=clocks.sm,power.draw,utilization.gpu --format=csv,noheader,nounits -lms 50 > $OUT/smi-$mb.csv &
  smi=$!
  /tmp/proxqat bench --shape llama-3.2-1b --tokenizer .carry/llama3.2-tokenizer.json --micro-batch $mb --seq 256 \
    --global-batch 128 --method fp --steps 6 2>/dev/null >> $OUT/bench.jsonl
  kill $smi; wait $smi 2>/dev/null
done
python3 - $OUT <<'PY'
import csv, json, statistics, sys
out = sys.argv[1]
for f in ("fused-4096", "fused-1024", "energy-4096", "overlap-4096", "overlap-1024"):
    print(f, open(f"{out}/{f}.txt").read().strip().splitlines()[-1])
for r in map(json.loads, open(f"{out}/bench.jsonl")):
    s = [[float(x) for x in l] for l in csv.reader(open(f"{out}/smi-{r['micro_batch']}.csv")) if len(l) == 3]
    busy = [x for x in s if x[2] >= 90]
    print(f"mb {r['micro_batch']:>2}  {r['tokens_per_s']:8.0f} tok/s  SM clock median {statistics.median(x[0] for x in busy):6.0f} MHz"
          f" (min {min(x[0] for x in busy):.0f})  power median {statistics.median(x[1] for x in busy):5.0f} W  ({len(busy)} busy samples)")
PY
