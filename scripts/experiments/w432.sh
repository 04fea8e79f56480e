#!/usr/bin/env bash
# Issue 8's comparison on the real SmolLM2-135M-Instruct fine-tuned on the Alpaca demo data, in one
# device command: for W4 / W3 / W2 on per-group-32 and per-channel grids, the fp fine-tune, RTN-PTQ of
# it, STE QAT and Prox-QAT with pull = "loss" and pull = "prox" — same steps, data and seed. Every QAT
# run is hardened (harden --all) and evaluated on the fixed validation split and on held-out raw text.
#
# usage: scripts/experiments/w432.sh BIN SMOLLM2.gguf ALPACA.json OUT
# env:   STEPS (50) MB (4) GB (16) VAL (100 records) JOBS (6 runs at once on one GPU) GRIDS METHODS
#        (METHOD[+ramp][+kdA][+lsM][@C], e.g. prox-prox-q+ls0.3@2000: learned scales at 0.3 × lr, pull
#        c = 2000; +ramp[G]: the pull gain γ ramps up from 0 with the hit rate (G, else GAMMA_LR, 0.1: its
#        step per 10 steps per unit of hit rate short of 0.95), so the first steps are STE-like; +gsN
#        (with +ramp): γ held at 0 until step N (else GAMMA_START, 0); +kdA: distillation from the fp
#        fine-tune (the run named fp), weight A (1.0 when not given), temperature KD_T (1.0) — the fp
#        run then goes first, alone; with KD_TEACHER_STEPS=N the teacher is a separate fp fine-tune of
#        N steps instead (a 300-step fp run overfits the demo data); +warm: the run starts from the
#        teacher's weights instead of the pretrained model's (two stages: its steps come on top of the
#        teacher's); +syn: the training split also holds the teacher's own
#        responses to its instructions, SYNTH_SAMPLES (4) per record at temperature SYNTH_T (1.0),
#        sampled once by `proxqat synth` after the teacher run; +sN: this run trains N steps instead of
#        STEPS; +seedN: training seed N instead of 1337 — batch order, same data split; +nosens: every
#        tensor's pull weight 1 (sensitivity off); +sensP: the sensitivity map's power P instead of 0.5;
#        +seedsens: the seed's floor of 1e-8 on S, with which every Prox-QAT run through RESULTS.md §22
#        ran, so their names carry no suffix)
#        FP_GRID (w4g32: the grid the fp run's hit rate is measured on) DEVICE (auto) EXPORT_CHECK (0)
#        GRID_RULE (absmax: how every grid's scales start, RTN's included; mse: least rounding error)
#        LR (5e-5: the QAT runs' peak learning rate, min LR/10; the fp runs keep 5e-5)
#        EVAL_EVERY (0: final only; N: a validation curve, and summarize.py adds a best-checkpoint table)
#        SAVE_EVERY (0: a checkpoint at the end only; N: every N steps too) KEEP_LAST (1; 0 keeps all)
#        BETA (1.5: λ's loss budget) DUAL_LR (1e-3: λ's step; 0 holds λ at 1) GAMMA_LR GAMMA_START (+ramp)
# Rows already in OUT/rows are kept: a second call with other GRIDS adds to the same table. A run cut
# short (e.g. by the device's 10-minute limit) resumes from its last checkpoint when called again.
set -euo pipefail
bin=$(realpath "$1"); gguf=$(realpath "$2"); data=$(realpath "$3"); out=$4
steps=${STEPS:-50}; mb=${MB:-4}; gb=${GB:-16}; val=${VAL:-100}; jobs=${JOBS:-6}; device=${DEVICE:-auto}
fp_grid=${FP_GRID:-w4g32}
grids=${GRIDS:-"w4g32 w4ch w3g32 w3ch w2g32 w2ch"}
methods=${METHODS:-"ste prox-loss prox-prox prox-prox-q"}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/cfg" "$out/runs" "$out/rows"
out=$(realpath "$out")

# The last 100 records are held out of training and validation: their text is the perplexity corpus.
python3 - "$data" "$out" <<'PY'
import json, sys
records = json.load(open(sys.argv[1]))
json.dump(records[:-100], open(f"{sys.argv[2]}/train.json", "w"))
with open(f"{sys.argv[2]}/heldout.txt", "w") as f:
    f.write("\n\n".join("\n".join(x for x in (r["instruction"], r.get("input", ""), r["output"]) if x) for r in records[-100:]))
PY

grid_toml() { # w4g32 → bits 4, per group of 32; w3ch → bits 3, per channel
  local bits=${1:1:1} kind=${1:2}
  if [ "$kind" = ch ]; then printf 'bits = %s\nscale = "channel"\n' "$bits"
  else printf 'bits = %s\nscale = "group"\ngroup_size = 32\n' "$bits"; fi
  printf 'rule = "%s"\n' "${GRID_RULE:-absmax}"
}
method_toml() { # METHOD[+ramp][+lsM][@C]: c after @ overrides C_LOSS / C_PROX; +ls learns the grid's scales
  local c="" m=${1%@*}
  [[ $1 == *@* ]] && c=${1#*@}
  [[ $m =~ \+ramp[0-9.]* ]] && m=${m/${BASH_REMATCH[0]}/}
  [[ $m =~ \+gs[0-9]+ ]] && m=${m/${BASH_REMATCH[0]}/}
  [[ $m =~ \+kd[0-9.]* ]] && m=${m/${BASH_REMATCH[0]}/}
  m=${m/+warm/}
  m=${m/+syn/}
  [[ $m =~ \+seed[0-9]+ ]] && m=${m/${BASH_REMATCH[0]}/}
  [[ $m =~ \+(no|seed)?sens[0-9.]* ]] && m=${m/${BASH_REMATCH[0]}/}
  [[ $m =~ \+s[0-9]+ ]] && m=${m/${BASH_REMATCH[0]}/}
  if [[ $m == *+ls* ]]; then # at M × the weights' lr (M from SCALE_LR_MULT, 1.0, when not given)
    local mult=${m#*+ls}
    printf 'scale_lr_mult = %s\n' "${mult:-${SCALE_LR_MULT:-1.0}}"
    m=${m%+ls*}
  fi
  case $m in
    fp) echo 'method = "fp"' ;;
    ste) echo 'method = "ste"' ;;
    prox-loss) printf 'method = "prox"\npull = "loss"\ndist_scale = %s\n' "${c:-${C_LOSS:-10.0}}" ;;
    prox-prox) printf 'method = "prox"\npull = "prox"\ndist_scale = %s\n' "${c:-${C_PROX:-2000.0}}" ;;
    # Prox-QAT with the task gradient taken at q(x), as STE takes it, and the prox pull on x.
    prox-prox-q) printf 'method = "prox"\npull = "prox"\ngrad_at = "q"\ndist_scale = %s\n' "${c:-${C_PROX:-2000.0}}" ;;
    *) echo "unknown method $1" >&2; exit 1 ;;
  esac
}
gamma_toml() { # +ramp[G][+gsN]: γ is 0 until step N (GAMMA_START, 0), then rises by G (GAMMA_LR, 0.1)·(0.95 − hit rate EMA) every 10 steps
  [[ $1 =~ \+ramp([0-9.]*) ]] || return 0
  local rate=${BASH_REMATCH[1]:-${GAMMA_LR:-0.1}} start=${GAMMA_START:-0}
  [[ $1 =~ \+gs([0-9]+) ]] && start=${BASH_REMATCH[1]}
  printf '[quant.gamma]\nenable = true\nstart = %s\ninit = 0.0\ntarget = 0.95\nlr = %s\nevery = 10\nema = 0.7\nmax = 3.0\n' "$start" "$rate"
}
sens_toml() { # +nosens: no sensitivity weighting; +sensP: power P of s = (S / mean S)^(−P), clamped;
  # +seedsens: S floored at 1e-8 (the seed)
  if [[ $1 == *+nosens* ]]; then printf '[quant.sens]\nenable = false\n'
  elif [[ $1 =~ \+sens([0-9.]+) ]]; then printf '[quant.sens]\npower = %s\n' "${BASH_REMATCH[1]}"
  elif [[ $1 == *+seedsens* ]]; then printf '[quant.sens]\nfloor = 1e-8\n'; fi
}
distill_toml() { # +kdA: the fp fine-tune is the teacher, at weight A
  [[ $1 =~ \+kd([0-9.]*) ]] || return 0
  printf '[distill]\nteacher = "%s"\nweight = %s\ntemperature = %s\n' "$out/runs/$teacher" "${BASH_REMATCH[1]:-1.0}" "${KD_T:-1.0}"
}
write_cfg() { # NAME GRID METHOD [STEPS]
  local model=$gguf lr=5e-5 run_steps=${4:-$steps} seed=1337
  [[ $3 =~ \+seed([0-9]+) ]] && seed=${BASH_REMATCH[1]}
  [[ $3 =~ \+s([0-9]+) ]] && run_steps=${BASH_REMATCH[1]}
  [[ $1 == *-* ]] && lr=${LR:-5e-5} # QAT rows (GRID-METHOD); the fp runs keep 5e-5
  [[ $3 == *+warm* ]] && model=$out/runs/$teacher
  cat > "$out/cfg/$1.toml" <<TOML
[model]
path = "$model"
[data]
path = "$out/train.json"
val_records = $val
max_seq_length = 256
$([[ $3 == *+syn* ]] && printf 'extra_train = ["%s"]' "$out/synth.json" || true)
[train]
out_dir = "$out/runs/$1"
micro_batch = $mb
global_batch = $gb
max_steps = $run_steps
lr = $lr
min_lr = $(python3 -c "print($lr / 10)")
warmup_steps = 5
log_every = 5
seed = $seed
save_every = ${SAVE_EVERY:-0}
keep_last = ${KEEP_LAST:-1}
device = "$device"
[eval]
every = ${EVAL_EVERY:-0}
initial = false
final = true
max_batches = 100
[quant]
$(method_toml "$3")
stats_every = 5
[quant.grid]
$(grid_toml "$2")
[quant.dual]
# The loss budget: near the fine-tune's loss, so λ stays near 1 (the seed's 2.9 is nanoGPT's).
beta = ${BETA:-1.5}
# DUAL_LR = 0 holds λ at 1: under the prox pull λ multiplies the selected tensors' AdamW step.
lr = ${DUAL_LR:-1e-3}
$(gamma_toml "$3")
$(sens_toml "$3")
$(distill_toml "$3")
TOML
}

# One QAT (or fp) run: train (or resume one cut short), harden --all, evaluate the hardened model;
# one JSON row. The wall time sums the run's training calls (OUT/runs/NAME.wall); a call killed by a
# time limit leaves NAME.wall.open (its start), and its time is counted up to the log's last write.
run_one() {
  local name=$1 grid=${1%%-*} method=${1#*-} start=--overwrite wall=$out/runs/$1.wall
  [ -s "$out/rows/$name.json" ] && return 0
  [ -e "$out/runs/$name/latest" ] && start=--resume
  [ -e "$wall.open" ] && python3 -c "import os; print(os.path.getmtime('$out/runs/$name.log') - $(cat "$wall.open"))" >> "$wall"
  [ $start = --overwrite ] && rm -f "$wall" # starting over: the time of earlier calls is not this run's
  local t0=$(date +%s.%N)
  echo "$t0" > "$wall.open"
  if ! $bin train --config "$out/cfg/$name.toml" $start >> "$out/runs/$name.log" 2>&1; then
    echo "$name: training failed or was cut; the end of $out/runs/$name.log:"; grep -v '^ *[0-9]*: \|^$\|at ' "$out/runs/$name.log" | tail -4
    return 0
  fi
  python3 -c "print($(date +%s.%N) - $t0)" >> "$wall" && rm "$wall.open"
  $bin harden --ckpt "$out/runs/$name" --all --out "$out/runs/$name-hard" --overwrite --json > "$out/runs/$name-harden.json"
  $bin eval --ckpt "$out/runs/$name-hard" --json > "$out/runs/$name-val.json"
  $bin eval --ckpt "$out/runs/$name-hard" --text "$out/heldout.txt" --seq-len 512 --json > "$out/runs/$name-text.json"
  python3 "$here/row.py" "$name" "$grid" "$method" "$out/runs/$name" "$(awk '{s += $1} END {print s}' "$wall")" > "$out/rows/$name.json"
}
export -f run_one; export bin out here

names=()
teacher=fp
write_cfg fp "$fp_grid" fp
if [ -n "${KD_TEACHER_STEPS:-}" ]; then teacher=teacher; write_cfg teacher "$fp_grid" fp "$KD_TEACHER_STEPS"; fi
for g in $grids; do
  write_cfg "$g-rtn" "$g" fp   # the grid `ptq` rounds the fp run to
  for m in $methods; do write_cfg "$g-$m" "$g" "$m"; names+=("$g-$m"); done
done
if [[ " ${names[*]}" == *+kd* || " ${names[*]}" == *+warm* ]]; then
  run_one $teacher # the teacher of the +kd runs, the start of the +warm runs
  [ -s "$out/rows/$teacher.json" ] || { echo "the $teacher run (the teacher) failed"; exit 1; }
fi
if [[ " ${names[*]}" == *+syn* && ! -s "$out/synth.json" ]]; then
  $bin synth --ckpt "$out/runs/$teacher" --samples "${SYNTH_SAMPLES:-4}" --temperature "${SYNTH_T:-1.0}" \
    --batch 128 --out "$out/synth.json" --json > "$out/synth-report.json" 2> "$out/synth.log"
fi
(echo fp; printf '%s\n' "${names[@]}") | xargs -P "$jobs" -I{} bash -c 'run_one {}'
for g in $grids; do
  [ -s "$out/rows/$g-rtn.json" ] && continue
  $bin ptq --ckpt "$out/runs/fp" --config "$out/cfg/$g-rtn.toml" --out "$out/runs/$g-rtn-hard" --overwrite --json > "$out/runs/$g-rtn-harden.json"
  $bin eval --ckpt "$out/runs/$g-rtn-hard" --json > "$out/runs/$g-rtn-val.json"
  $bin eval --ckpt "$out/runs/$g-rtn-hard" --text "$out/heldout.txt" --seq-len 512 --json > "$out/runs/$g-rtn-text.json"
  python3 "$here/row.py" "$g-rtn" "$g" rtn "$out/runs/fp" 0 > "$out/rows/$g-rtn.json"
done
# With a separate teacher, RTN as §10 of RESULTS.md measures it: the teacher (≈ fp's best checkpoint)
# rounded to each grid with scales fresh from its own weights; summarize.py's best-checkpoint table uses it.
if [ "$teacher" = teacher ]; then
  for g in $grids; do
    [ -s "$out/runs/teacher-$g-rtn-val.json" ] && continue
    $bin ptq --ckpt "$out/runs/teacher" --config "$out/cfg/$g-rtn.toml" --out "$out/runs/teacher-$g-rtn-hard" --overwrite --json > "$out/runs/teacher-$g-rtn-harden.json"
    $bin eval --ckpt "$out/runs/teacher-$g-rtn-hard" --json > "$out/runs/teacher-$g-rtn-val.json"
  done
fi
[ -s "$out/runs/fp-text-fp.json" ] || $bin eval --ckpt "$out/runs/fp" --text "$out/heldout.txt" --seq-len 512 --json > "$out/runs/fp-text-fp.json"
python3 "$here/summarize.py" "$out" "$fp_grid" | tee "$out/table.md"

# The HF export of a hardened Prox-QAT model, loaded by transformers: loss, logits and gradients agree.
if [ "${EXPORT_CHECK:-0}" = 1 ]; then
  hard=$out/runs/${grids%% *}-prox-prox-hard
  $bin export --ckpt "$hard" --format hf --out "$out/export-hf" --overwrite --json > "$out/export-hf.json"
  $bin gpu-check dump-grads --ckpt "$out/export-hf" --dtype f32 --out "$out/export-hf-dump.safetensors"
  python3 "$(dirname "$here")/torch_parity.py" "$out/export-hf" "$out/export-hf-dump.safetensors" f32 | tee "$out/export-hf-parity.txt"
fi
