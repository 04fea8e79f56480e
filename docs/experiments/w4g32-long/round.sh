#!/usr/bin/env bash
# RESULTS.md §13: does the W4 g32 student keep improving past 600 steps? §12's best setting (distillation
# at temperature 2 from the 100-step fp fine-tune, its own samples as extra data, mse scales, learned
# scales, lr 2e-4, from the teacher's weights) at 1200 steps (§12: 600), Prox-QAT and STE + learned
# scales; micro-batch 16 (one micro-step per step of global batch 16: fewer launches, same batch).
# Here, once per binary: `[PARTS=2] bash docs/experiments/w4g32-long/round.sh prep CUDA_BINARY` writes
# the git-ignored .carry (the binary, the Alpaca demo data and the xz-compressed GGUF's first part) and
# .carry2 … .carryPARTS (its other parts), sized so that each call, the tracked files included, stays
# under the 64 MiB a call carries; it fails, naming the PARTS that would fit, when they do not. On the
# device, one call per folder but the last (carry .carry, then .carry2 …: `bash
# docs/experiments/w4g32-long/round.sh stage` copies it to /tmp/pq), then the round's calls carrying
# the last folder: the first joins the GGUF, checks its sha256 and runs the round; a call cut by the
# 10-minute limit is continued by calling again (runs resume from their checkpoints, every 300 steps).
# Results: $OUT/round.tgz (no checkpoints), $OUT/log.txt.
# env: METHODS (the two 1200-step runs), GRIDS (w4g32), LIMIT (530 s for the round in one call),
# CODE_CHANGES (below)
# Run 2026-12-07 on an H100 (binary of cb65007): the default, then
#   METHODS="prox-prox-q+kd+ls+warm+syn+s2400@2000 ste+kd+ls+warm+syn+s2400" (same /tmp/pq/out).
# Run 2026-12-07 on an H100 (binary of cb65007), RESULTS.md §14, on a fresh machine in three calls
# (the first two cut at the limit):
#   METHODS="prox-prox-q+kd+ls+warm+syn+s4800@100 prox-prox-q+kd+ls+warm+syn+s4800@400 ste+kd+ls+warm+syn+s4800" LIMIT=570
# Run 2026-12-07 on an H100 (binary of 9624997, sampler with a KV cache), RESULTS.md §15, one call
# after staging: the weak pull at 2400 steps, where STE peaked:
#   METHODS="prox-prox-q+kd+ls+warm+syn+s2400@100" LIMIT=470
# Run 2026-12-07 on an H100 (binary of 82e8633), RESULTS.md §16, one call after staging: λ held at 1,
# so that Prox-QAT's MLP step anneals with the schedule as STE's does (no difference):
#   DUAL_LR=0 METHODS="prox-prox-q+kd+ls+warm+syn+s2400@100" LIMIT=480
# Run 2026-12-07 on an H100 (binary of 82e8633), RESULTS.md §17, four calls on one machine after staging
# (same /tmp/pq/out, one reference): weaker pulls, then three more seeds of Prox-QAT c = 100 and STE:
#   METHODS="prox-prox-q+kd+ls+warm+syn+s2400@10 prox-prox-q+kd+ls+warm+syn+s2400@30" LIMIT=480
#   METHODS="prox-prox-q+kd+ls+warm+syn+s2400+seedN@100 ste+kd+ls+warm+syn+s2400+seedN" LIMIT=470  (N = 2, 3, 4)
# Run 2026-12-07 on an H100 (source of d833513), RESULTS.md §18, two calls after staging (~40 GB of
# checkpoints on disk): how many codes each method changes per 300 steps:
#   KEEP_LAST=0 CODE_CHANGES=1 METHODS="prox-prox-q+kd+ls+warm+syn+s2400@100 prox-prox-q+kd+ls+warm+syn+s2400@10 ste+kd+ls+warm+syn+s2400" LIMIT=450
# Run 2026-12-07 on an H100 (source of d833513), RESULTS.md §19, two calls after staging (the first cut
# at the limit, the second with LIMIT=420 resumed): Prox-QAT whose codes are free before the pull holds
# them (§18), a slow ramp from step 0 (+ramp0.0005: c·γ ≈ 1.3 at step 300, ~10 by the end) and STE-like
# (γ = 0) until step 1200, then §7's fast ramp (+ramp+gs1200), beside the plain pull:
#   KEEP_LAST=0 CODE_CHANGES=1 METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400@100 prox-prox-q+kd+ls+warm+syn+ramp+gs1200+s2400@2000 prox-prox-q+kd+ls+warm+syn+s2400@100" LIMIT=450
# Run 2026-12-07 on an H100 (source of d833513), RESULTS.md §20, five calls on one machine after staging
# (same /tmp/pq/out, one reference): the slow ramp over three more seeds (the first call cut at the
# limit, the second with LIMIT=420 resumed), other ramp rates at seed 1337 (the same two calls), then
# λ held at 1 (the `+seed1337` suffix only names the run apart from the λ-learned one):
#   METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400+seed2@100 prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400+seed3@100 prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400+seed4@100" LIMIT=450
#   METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.00025+s2400@100 prox-prox-q+kd+ls+warm+syn+ramp0.001+s2400@100 prox-prox-q+kd+ls+warm+syn+ramp0.002+s2400@100" LIMIT=450
#   DUAL_LR=0 METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400@100" LIMIT=300
#   DUAL_LR=0 METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.00025+s2400+seed1337@100" LIMIT=245
# Run 2026-12-07 on an H200 (binary of 70a4e05), RESULTS.md §21, three calls on one machine after staging
# (same /tmp/pq/out): the slower ramp over three more seeds (cut at the limit; the second call resumed
# it with LIMIT=260, then ran the W3 pair), then the W3 plain pull alone:
#   METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.00025+s2400+seed2@100 prox-prox-q+kd+ls+warm+syn+ramp0.00025+s2400+seed3@100 prox-prox-q+kd+ls+warm+syn+ramp0.00025+s2400+seed4@100" LIMIT=450
#   GRIDS=w3g32 METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400@100 ste+kd+ls+warm+syn+s2400" LIMIT=310
#   GRIDS=w3g32 METHODS="prox-prox-q+kd+ls+warm+syn+s2400@100" LIMIT=250
# (Two round.sh calls in one command: `mv $OUT/round.tgz $OUT/round-A.tgz` between them.)
# Run 2026-12-08 on an H100 (binary of b4e66d1), RESULTS.md §22, one call after staging, cut at the
# limit with the runs at steps 1570–1815; the machine was taken back during the resuming call and the
# checkpoints were lost (the curves came back: sens-ablation-cut/):
#   METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+nosens+s2400@100 prox-prox-q+kd+ls+warm+syn+ramp0.0005+nosens+s2400+seed2@100 prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400@100 prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400+seed2@100" LIMIT=540
# Next (not run), with a binary of 2026-12-08 or later, whose sensitivity map has no floor unless
# asked (`+seedsens` reproduces the floored map of every run above; runs without it, the same names as
# before, now use the fixed map): the uniform pull and the fixed map to the end over four seeds each
# (§22 cut the first; two sharing the GPU finish in ~300–315 s after the ~140 s setup), against §19–§20's
# finished floored runs at the same seeds (§22: reruns agree within 0.0008 nats); W2 g32 at 2400 steps
# with the slow ramp and STE (§9's W2 rows are 300 steps; its RTN reference comes with the grid); more
# seeds of the W3 pair:
#   METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+nosens+s2400@100 prox-prox-q+kd+ls+warm+syn+ramp0.0005+nosens+s2400+seed2@100" LIMIT=460
#   METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+nosens+s2400+seed3@100 prox-prox-q+kd+ls+warm+syn+ramp0.0005+nosens+s2400+seed4@100" LIMIT=330
#   METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400@100 prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400+seed2@100" LIMIT=330  (then seeds 3, 4)
#   GRIDS=w2g32 METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400@100 ste+kd+ls+warm+syn+s2400" LIMIT=450
#   GRIDS=w3g32 METHODS="prox-prox-q+kd+ls+warm+syn+ramp0.0005+s2400+seed2@100 ste+kd+ls+warm+syn+s2400+seed2" LIMIT=450
set -o pipefail
cd "$(dirname "$0")/../../.."
d=/tmp/pq
mkdir -p $d
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ "${1:-}" = prep ]; then # here: PARTS (2) carry folders, .carry holding the binary and the data too
  bin=${2:?usage: round.sh prep CUDA_BINARY (e.g. target/cuda/release/proxqat)} parts=${PARTS:-2}
  rm -rf .carry .carry[0-9]* && mkdir -p .carry
  xz -T2 -c "$bin" > .carry/proxqat.xz
  cp assets/alpaca_en_demo.json .carry/
  xz -T2 -6 -c assets/SmolLM2-135M-Instruct.Q4_1.gguf > $d/smol.gguf.xz
  # Every folder weighs the same: .carry's other files count against its part of the GGUF.
  others=$(du -cb .carry/* | tail -n 1 | cut -f1) total=$(stat -c %s $d/smol.gguf.xz)
  per=$(((others + total + parts - 1) / parts)) offset=0
  for ((i = 1; i <= parts; i++)); do
    dir=.carry$([ $i -gt 1 ] && echo $i) len=$per
    [ $i = 1 ] && len=$((per - others))
    mkdir -p $dir && tail -c +$((offset + 1)) $d/smol.gguf.xz | head -c $len > $dir/smol.gguf.xz.$i
    offset=$((offset + len))
  done
  cat .carry*/smol.gguf.xz.* | cmp - $d/smol.gguf.xz && rm $d/smol.gguf.xz
  tracked=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
  for dir in .carry .carry[0-9]*; do
    n=$((tracked + $(du -cb $dir/* | tail -n 1 | cut -f1)))
    echo "$dir: $n bytes with the tracked files (limit $((64 << 20)))"
    [ $n -lt $((64 << 20)) ] || { echo "$dir: over the 64 MiB a call carries: prep again with PARTS=$((parts + 1))" >&2; exit 1; }
  done
  exit
fi
# Every call copies the carry folder it brought (.carry, .carry2, …); `stage` only that.
for dir in .carry .carry[0-9]*; do [ -d $dir ] && cp $dir/* $d/; done
if [ "${1:-}" = stage ]; then ls -la $d; exit; fi
source scripts/device-env.sh
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader | tee -a $OUT/log.txt
if [ ! -x $d/proxqat ]; then
  cat $(ls $d/smol.gguf.xz.* | sort -V) | xz -dc > $d/smol.gguf
  echo "$gguf_sha  $d/smol.gguf" | sha256sum -c --quiet || { echo "a carry part is missing: stage each folder first" >&2; exit 1; }
  xz -dc $d/proxqat.xz > $d/proxqat && chmod +x $d/proxqat
fi
KD_T=2 GRID_RULE=mse STEPS=300 EVAL_EVERY=50 SAVE_EVERY=300 KD_TEACHER_STEPS=100 LR=2e-4 MB=16 JOBS=4 GRIDS=${GRIDS:-w4g32} \
  METHODS=${METHODS:-"prox-prox-q+kd+ls+warm+syn+s1200@2000 ste+kd+ls+warm+syn+s1200"} \
  timeout -k 5 ${LIMIT:-530} scripts/experiments/w432.sh $d/proxqat $d/smol.gguf $d/alpaca_en_demo.json $d/out 2>&1 | tee -a $OUT/log.txt
# Where each run got (w432.sh prints its tables only when every run has finished, so a round cut at
# LIMIT leaves only these lines in log.txt).
for r in $d/out/runs/*/metrics.jsonl; do [ -e "$r" ] && echo "$r: $(tail -n 1 "$r" | cut -c1-160)"; done | tee -a $OUT/log.txt
# CODE_CHANGES=1 (runs trained with KEEP_LAST=0, so every 300-step checkpoint stays): the share of the MLP
# codes each finished run changed between consecutive checkpoints, `stats --against`, appended to
# code-changes.tsv once per run, and of its first and last checkpoints against the start's codes
# (teacher-GRID-rtn-hard) to code-changes-vs-rtn.tsv (~4 s per pair: leave ~40 s of the call per run).
if [ "${CODE_CHANGES:-0}" = 1 ]; then
  rate() { $d/proxqat stats --ckpt "$1" --against "$2" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["total"]["code_change_rate"])'; }
  for r in $d/out/runs/w[0-9]*-*/; do
    n=$(basename "$r") start=$d/out/runs/teacher-${n%%-*}-rtn-hard
    [ -s "$d/out/rows/$n.json" ] || continue # not finished: a later call
    grep -qF "$n"$'\t' $d/out/code-changes.tsv 2>/dev/null && continue
    ckpts=($(ls -d "$r"step-* | sort))
    for ((i = 1; i < ${#ckpts[@]}; i++)); do
      printf '%s\t%s\t%s\t%s\n' "$n" "$(basename "${ckpts[i-1]}")" "$(basename "${ckpts[i]}")" "$(rate "${ckpts[i]}" "${ckpts[i-1]}")" >> $d/out/code-changes.tsv
    done
    for c in "${ckpts[0]}" "${ckpts[-1]}"; do
      printf '%s\t%s\t%s\t%s\n' "$n" "$(basename "$c")" "$(basename "$start")" "$(rate "$c" "$start")" >> $d/out/code-changes-vs-rtn.tsv
    done
  done
  tail -n +1 $d/out/code-changes*.tsv | tee -a $OUT/log.txt
fi
# Checkpoints (and the partial ones of a cut call, hidden .NAME.tmp-PID / .old-PID) stay on the machine.
(cd $d/out && tar czf $OUT/round.tgz --exclude='step-*' --exclude='.*.tmp-*' --exclude='.*.old-*' --exclude='*-hard' --exclude=train.json --exclude=synth.json .)
