#!/usr/bin/env bash
# The main job on the embedded demo: fetch the real assets, build, fine-tune SmolLM2-135M-Instruct with
# Prox-QAT on the Alpaca demo data (configs/demo.toml), then inspect, harden, export to GGUF (Q4_0, exact)
# and plot the run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/fetch-assets.sh
cargo build --release
bin=target/release/proxqat
$bin train --config configs/demo.toml --overwrite "$@"
$bin stats --ckpt runs/demo | tail -4
$bin harden --ckpt runs/demo --all --out runs/demo-hard --overwrite | tail -1
$bin export --ckpt runs/demo-hard --format gguf --out runs/demo-q4.gguf --dtype f16 --overwrite | tail -1
$bin eval --ckpt runs/demo-q4.gguf --prompt "The capital of France is" --max-new-tokens 12
$bin plot --run runs/demo --overwrite
