#!/usr/bin/env python3
"""One result row of w432.sh as JSON: final val losses, hardened val loss and text perplexity,
hit / saturation rates, wall time.  usage: row.py NAME GRID METHOD RUN_DIR WALL_S"""
import json
import os
import sys


def best_and_late(records, key):
    """The validation curve's best evaluation (its record) and the mean of `key` over the last quarter
    of the run (12 evaluations of 2400 steps at EVAL_EVERY=50): less luck than the single best
    evaluation when two runs are compared."""
    steps = [r for r in records if r["kind"] == "train"][-1]["step"]
    evals = [r for r in records if r["kind"] == "eval"]
    late = [r[key] for r in evals if r["step"] > 0.75 * steps]
    return min(evals, key=lambda r: r[key]), sum(late) / len(late)


if __name__ == "__main__":
    name, grid, method, run, wall = sys.argv[1:6]
    runs = os.path.dirname(run)
    records = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
    evals = [r for r in records if r["kind"] == "eval"]
    final_eval = evals[-1]
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
    # The validation curve (EVAL_EVERY): the best checkpoint by validation loss, as a user who keeps the
    # best checkpoint would ship it. A QAT run ships q(x) (its hardened model), the fp run its float
    # weights, and RTN rounds the fp weights of the fp run's best step (the eval's q: scales of the start).
    if len(evals) > 1:
        key = "val_loss_fp" if method in ("fp", "rtn") else "val_loss_q"
        best, late = best_and_late(records, key)
        row.update(best_step=best["step"], best_val=best[key], best_val_q=best["val_loss_q"], late_val=late)
    print(json.dumps(row))
