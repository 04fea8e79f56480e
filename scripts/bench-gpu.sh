#!/usr/bin/env bash
# proxqat vs PyTorch on the same GPU in one command: Llama-3.2-1B shape, random weights, global batch 128
# × 256 tokens, micro-batch 4 (the seed's setup) and 16; proxqat fp and prox, PyTorch eager and compile.
# usage (on the GPU machine): scripts/bench-gpu.sh BIN ASSETS_DIR OUT_DIR
set -uo pipefail
bin=$1; assets=$2; out=$3
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1091
source "$here/device-env.sh"
mkdir -p "$out"; : > "$out/bench.jsonl"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
for mb in ${BENCH_MB:-4 16}; do
  for method in fp prox prox-loss; do
    $bin bench --shape llama-3.2-1b --tokenizer "$assets/llama3.2-tokenizer.json" --micro-batch $mb --seq 256 \
      --global-batch 128 --method $method --steps ${BENCH_STEPS:-2} 2>>"$out/bench.log" | sed "s/^{/{\"impl\":\"proxqat-$method\",/" >> "$out/bench.jsonl"
  done
  # The same step on candle primitives (train.kernels = "reference"): what the fused kernels buy.
  [ $mb = 4 ] && $bin bench --shape llama-3.2-1b --tokenizer "$assets/llama3.2-tokenizer.json" --micro-batch $mb --seq 256 \
      --global-batch 128 --method fp --kernels reference --steps ${BENCH_STEPS:-2} 2>>"$out/bench.log" | sed "s/^{/{\"impl\":\"proxqat-fp-ref\",/" >> "$out/bench.jsonl"
  for mode in eager compile; do
    python3 "$here/torch_reference.py" $mb 256 128 $mode 2>>"$out/torch.log" >> "$out/bench.jsonl"
  done
done
# Activation checkpointing per block (train.checkpoint_layers) against PyTorch eager with and without
# HF's gradient checkpointing, at the micro-batches where activations dominate memory.
for mb in ${BENCH_CKPT_MB-16 32}; do
  for method in fp prox; do
    $bin bench --shape llama-3.2-1b --tokenizer "$assets/llama3.2-tokenizer.json" --micro-batch $mb --seq 256 \
      --global-batch 128 --method $method --checkpoint-layers --steps ${BENCH_STEPS:-2} 2>>"$out/bench.log" | sed "s/^{/{\"impl\":\"proxqat-$method-ckpt\",/" >> "$out/bench.jsonl"
  done
  modes="eager-ckpt"; grep -q "\"torch-eager\", \"micro_batch\": $mb," "$out/bench.jsonl" || modes="eager eager-ckpt"
  for mode in $modes; do
    python3 "$here/torch_reference.py" $mb 256 128 $mode 2>>"$out/torch.log" >> "$out/bench.jsonl"
  done
done
python3 - "$out/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'impl':<18} {'mb×seq':>7} {'ms/micro':>9} {'ms/opt':>8} {'ms/step':>9} {'tok/s':>8} {'MFU':>6} {'peak GiB':>9} {'vs eager':>9} {'vs compile':>10} {'vs eager-ckpt':>13}")
for r in rows:
    ref = {x["impl"]: x for x in rows if x["micro_batch"] == r["micro_batch"]}
    ratio = lambda k: r["tokens_per_s"] / ref[k]["tokens_per_s"] if k in ref else float("nan")
    print(f"{r['impl']:<18} {r['micro_batch']:>3}×{r['seq']:<3} {r['ms_micro_step']:>9.1f} {r['ms_optimizer']:>8.1f} {r['ms_step']:>9.0f} "
          f"{r['tokens_per_s']:>8.0f} {100*r['mfu']:>5.1f}% {r['peak_gib']:>9.1f} {ratio('torch-eager'):>8.2f}× {ratio('torch-compile'):>9.2f}× {ratio('torch-eager-ckpt'):>12.2f}×")
for r in rows:
    if r["impl"].startswith("proxqat"):
        print(f"breakdown {r['impl']} mb{r['micro_batch']}: forward {r['ms_forward']:.1f} ms + backward {r['ms_backward']:.1f} ms per micro-step; "
              f"clip+sync {r['ms_clip_sync']:.1f} ms, optimizer+quant {r['ms_optimizer']:.1f} ms per step")
PY
