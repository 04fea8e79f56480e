#!/usr/bin/env bash
# Issue 8 item 5: the comparison at Llama-3.2-1B shape (random weights: the loss values mean nothing;
# this shows the controllers behave at scale and no run diverges), with speed and peak GPU memory.
# usage: scripts/experiments/llama1b-stability.sh BIN LLAMA3.2-TOKENIZER.json ALPACA.json OUT
# env: STEPS (30) SHAPE (llama-3.2-1b; tiny for a CPU smoke run) METHODS ("fp ste prox-loss prox-prox-q")
set -euo pipefail
bin=$(realpath "$1"); tok=$(realpath "$2"); data=$(realpath "$3"); out=$4
steps=${STEPS:-30}; methods=${METHODS:-"fp ste prox-loss prox-prox-q"}
mkdir -p "$out"; out=$(realpath "$out")
[ -d "$out/model" ] || $bin gpu-check write-random --shape "${SHAPE:-llama-3.2-1b}" --tokenizer "$tok" --out "$out/model"
for m in $methods; do
  case $m in
    fp) q='method = "fp"' ;;
    ste) q='method = "ste"' ;;
    prox-loss) q=$'method = "prox"\npull = "loss"\ndist_scale = 300.0' ;;
    prox-prox-q) q=$'method = "prox"\npull = "prox"\ngrad_at = "q"\ndist_scale = 2000.0' ;;
  esac
  cat > "$out/$m.toml" <<TOML
[model]
path = "$out/model"
[data]
path = "$data"
val_records = 16
max_seq_length = 256
[train]
out_dir = "$out/run-$m"
micro_batch = 4
global_batch = 16
max_steps = $steps
lr = 5e-5
warmup_steps = 3
log_every = 1
[eval]
every = 0
initial = false
final = true
max_batches = 4
[quant]
$q
stats_every = 5
[quant.grid]
bits = 4
scale = "group"
group_size = 32
[quant.dual]
beta = 10.0
TOML
  (while sleep 2; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null || true; done) > "$out/$m.mem" &
  mon=$!
  $bin train --config "$out/$m.toml" --overwrite > "$out/$m.log" 2>&1 || echo "$m: FAILED (see $out/$m.log)"
  kill $mon 2>/dev/null || true
done
python3 - "$out" $methods <<'PY'
import json, sys
out, methods = sys.argv[1], sys.argv[2:]
print("| method | steps | loss first → last | skipped | λ min..max | hit rate last | tokens/s (steps ≥ 5) | peak GPU MiB |")
print("|---|---|---|---|---|---|---|---|")
for m in methods:
    rec = [json.loads(l) for l in open(f"{out}/run-{m}/metrics.jsonl") if '"train"' in l]
    lam = [r["lambda"] for r in rec if r.get("lambda") is not None]
    hit = [r["hit_rate"] for r in rec if r.get("hit_rate") is not None]
    tps = [r["tokens_per_s"] for r in rec if r["step"] >= 5]
    mem = max(int(x) for x in open(f"{out}/{m}.mem").read().split() or [0])
    lam_s = f"{min(lam):.3f}..{max(lam):.3f}" if lam else "—"
    print(f"| {m} | {rec[-1]['step']} | {rec[0]['loss']:.3f} → {rec[-1]['loss']:.3f} | {sum(r['skipped'] for r in rec)} | "
          f"{lam_s} | {hit[-1] if hit else float('nan'):.3f} | {sum(tps)/len(tps):,.0f} | {mem:,} |")
PY
