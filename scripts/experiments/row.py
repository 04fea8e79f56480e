#!/usr/bin/env python3
"""One result row of w432.sh as JSON: final val losses, hardened val loss and text perplexity,
hit / saturation rates, wall time.  usage: row.py NAME GRID METHOD RUN_DIR WALL_S"""
import json
import os
import sys

name, grid, method, run, wall = sys.argv[1:6]
runs = os.path.dirname(run)
records = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
final_eval = [r for r in records if r["kind"] == "eval"][-1]
last_train = [r for r in records if r["kind"] == "train"][-1]
hard_val = json.load(open(f"{runs}/{name}-val.json"))
text = json.load(open(f"{runs}/{name}-text.json"))
row = {
    "name": name, "grid": grid, "method": method,
    # The float weights at the end of training (for rtn: of the fp fine-tune it rounds).
    "val_fp": final_eval["val_loss_fp"],
    # The hardened model (every selected weight on the grid): what ships.
    "val_hard": hard_val["val_loss"],
    "text_ppl_hard": text["text_ppl"],
    "hit_rate": None if method == "rtn" else last_train.get("hit_rate"),
    "sat_rate": None if method == "rtn" else last_train.get("sat_rate"),
    "wall_s": float(wall),
    "steps": last_train["step"],
}
print(json.dumps(row))
