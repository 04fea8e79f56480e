#!/usr/bin/env python3
"""Seed statistics over runs of several w432.sh rounds (RESULTS.md §17, §20, §21): per group of runs,
the mean ± sample standard deviation of the RTN gap recovered at the best checkpoint and over the last
quarter of the run, and of the hardened model's text perplexity; then the differences of chosen pairs
of groups with Welch's t.
usage: seeds.py GROUPS.json   (prints markdown)
GROUPS.json: {"groups": {LABEL: [RUN, ...]}, "compare": [[LABEL_A, LABEL_B], ...]}, each RUN a path
relative to GROUPS.json's folder: FOLDER/NAME, where FOLDER holds the round's results.json and
NAME.metrics.jsonl (as docs/experiments/* keep them). Each run's gap is measured against its own round's
reference (fp's best, RTN of the teacher on the run's grid), as that round's table measured it."""
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from row import best_and_late  # noqa: E402  (the same reading of the curve as each round's table)


def run_stats(path):
    """(best gap, last-quarter gap, text ppl) of one run, as row.py and summarize.py compute them."""
    folder, name = os.path.split(path)
    results = json.load(open(f"{folder}/results.json"))
    row = next(r for r in results["rows"] if r["name"] == name)
    rtn = results["rtn_best"]
    rtn = rtn[row["grid"]] if isinstance(rtn, dict) else rtn
    fp_best = results["fp"]["best_val"]
    records = [json.loads(l) for l in open(f"{folder}/{name}.metrics.jsonl")]
    best, late = best_and_late(records, "val_loss_q")
    gap = lambda val: 100 * (rtn - val) / (rtn - fp_best)
    return gap(best["val_loss_q"]), gap(late), row["text_ppl_hard"]


def welch(a, b):
    return (statistics.mean(a) - statistics.mean(b)) / math.sqrt(
        statistics.variance(a) / len(a) + statistics.variance(b) / len(b)
    )


spec_path = sys.argv[1]
spec = json.load(open(spec_path))
here = os.path.dirname(os.path.abspath(spec_path))
groups = {
    label: list(zip(*(run_stats(os.path.join(here, run)) for run in runs)))
    for label, runs in spec["groups"].items()
}
ms = lambda xs, f: f"{statistics.mean(xs):{f}} ± {statistics.stdev(xs):{f}}"
lines = [
    "| group | runs | RTN gap, best checkpoint (min–max) | RTN gap, last quarter | text ppl |",
    "|---|---|---|---|---|",
]
for label, (best, late, ppl) in groups.items():
    lines.append(
        f"| {label} | {len(best)} | {ms(best, '.1f')} ({min(best):.1f}–{max(best):.1f}) | "
        f"{ms(late, '.1f')} | {ms(ppl, '.3f')} |"
    )
for a, b in spec.get("compare", []):
    ga, gb = groups[a], groups[b]
    diffs = [
        f"{statistics.mean(x) - statistics.mean(y):+{f}} (t = {welch(x, y):.1f})"
        for x, y, f in zip(ga, gb, (".1f", ".1f", ".3f"))
    ]
    lines.append(f"| {a} − {b} | | {' | '.join(diffs)} |")
print("\n".join(lines))
