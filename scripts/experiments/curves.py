#!/usr/bin/env python3
"""Hardened validation loss (val_loss_q) of runs at matched steps, for runs that did not all finish
(RESULTS.md §22: a round cut when its machine was taken back). Prints markdown: one row per run, its
loss at each of STEPS and its best evaluation up to the last of STEPS, then each pair's difference
(first run − second) at every step both evaluated.
usage: curves.py STEPS RUN.metrics.jsonl... [--pair A B ...]   (STEPS comma-separated; A, B: indices
into the runs, from 0)"""
import argparse
import json

parser = argparse.ArgumentParser()
parser.add_argument("steps")
parser.add_argument("runs", nargs="+")
parser.add_argument("--pair", nargs=2, type=int, action="append", default=[])
args = parser.parse_args()
steps = [int(s) for s in args.steps.split(",")]
curves = [
    {r["step"]: r["val_loss_q"] for r in map(json.loads, open(path)) if r["kind"] == "eval"}
    for path in args.runs
]
names = [path.removesuffix(".metrics.jsonl") for path in args.runs]
cell = lambda curve, s: f"{curve[s]:.4f}" if s in curve else "—"
print(f"| run | last eval | {' | '.join(map(str, steps))} | best ≤ {steps[-1]} (step) |")
print(f"|---|---|{'---|' * len(steps)}---|")
for name, curve in zip(names, curves):
    upto = {s: v for s, v in curve.items() if 0 < s <= steps[-1]}
    best = min(upto, key=upto.get)
    row = " | ".join(cell(curve, s) for s in steps)
    print(f"| {name} | {max(curve)} | {row} | {upto[best]:.4f} ({best}) |")
for a, b in args.pair:
    common = sorted(s for s in set(curves[a]) & set(curves[b]) if s > 0)
    diffs = " ".join(f"{s}: {1e4 * (curves[a][s] - curves[b][s]):+.0f}" for s in common)
    print(f"\n{names[a]} − {names[b]}, 1e-4 nats: {diffs}")
