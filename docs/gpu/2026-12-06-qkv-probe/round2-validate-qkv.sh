#!/usr/bin/env bash
# Validating 7367a3e (q/k/v as one projection, "new") beside main's binary ("old") in one device command.
# Parts in order of need, each into $OUT as it ends (the device time may run out): gpu-check (a) on new;
# whole steps alternating (fp, mb 16 and 4), round 1; gpu-check (c); round 2; gpu-check (b).
# Needs .carry/ (copy this script there): proxqat-old.xz (main's CUDA binary), proxqat-new.xz (built with
# 7367a3e re-applied), llama3.2-tokenizer.json and alpaca_en_demo.json (assets/); run as
# `bash .carry/round2-validate-qkv.sh` with carry [".carry"].
cd "$(dirname "$0")/.."
source scripts/device-env.sh
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader | tee $OUT/gpu.txt
for b in old new; do xz -dc .carry/proxqat-$b.xz > /tmp/proxqat-$b; chmod +x /tmp/proxqat-$b; done
check() { GPU_CHECKS=$1 timeout $2 scripts/gpu-check.sh /tmp/proxqat-new .carry /tmp/check > $OUT/gpu-check-$1.txt 2>&1
  echo "gpu-check $1 rc $? PASS rows $(grep -c PASS $OUT/gpu-check-$1.txt)"; grep FAIL $OUT/gpu-check-$1.txt | head -5; }
ab() { ROUNDS=1 MBS="16 4" scripts/experiments/ab-bench.sh .carry $OUT/ab old=/tmp/proxqat-old new=/tmp/proxqat-new > $OUT/ab.txt 2>&1; cat $OUT/ab.txt; }
check a 150
ab
check c 150
ab
check b 150; tail -2 $OUT/gpu-check-b.txt
