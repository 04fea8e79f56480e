#!/usr/bin/env bash
# Session 16 round 1, beside main's binary ("old"): q/k/v as one projection ("qkv"); with unwritten
# gradient accumulators on top ("new": the first micro-batch's weight-gradient GEMMs overwrite them,
# β = 0); with the head's cross-entropy gradient written in its forward pass on top of that ("ce": the
# head's GEMMs scale it by an α read on the device).
# Parts in order of need, each into $OUT as it ends: gpu-check (a) and (c) on ce; whole steps alternating
# (fp, mb 16 and 4), round 1; gpu-check (b) on ce; round 2.
# Needs .carry/: proxqat-{old,qkv,new,ce}.xz, llama3.2-tokenizer.json, alpaca_en_demo.json and this
# script; run as `bash .carry/round1.sh` with carry [".carry"].
cd "$(dirname "$0")/.."
source scripts/device-env.sh
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader | tee $OUT/gpu.txt
bins="old qkv new ce"
for b in $bins; do xz -dc .carry/proxqat-$b.xz > /tmp/proxqat-$b; chmod +x /tmp/proxqat-$b; done
check() { GPU_CHECKS=$1 timeout $2 scripts/gpu-check.sh /tmp/proxqat-ce .carry /tmp/check > $OUT/gpu-check-$1.txt 2>&1
  echo "gpu-check $1 rc $? PASS rows $(grep -c PASS $OUT/gpu-check-$1.txt) FAIL rows $(grep -c FAIL $OUT/gpu-check-$1.txt)"
  grep FAIL $OUT/gpu-check-$1.txt | head -5; }
ab() { ROUNDS=1 MBS="16 4" scripts/experiments/ab-bench.sh .carry $OUT/ab $(for b in $bins; do echo $b=/tmp/proxqat-$b; done) \
  > $OUT/ab.txt 2>&1; cat $OUT/ab.txt; }
check a 120
check c 100
ab
check b 150; tail -2 $OUT/gpu-check-b.txt
ab
