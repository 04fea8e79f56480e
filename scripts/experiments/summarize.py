#!/usr/bin/env python3
"""The w432.sh table: per grid, fp / RTN / STE / Prox-QAT rows and the fraction of the RTN gap each
recovers, (val_RTN − val_method) / (val_RTN − val_fp), on hardened validation loss.
usage: summarize.py OUT [FP_GRID]   (the fp run is the row named "fp", its hit rate and curve's q measured
on FP_GRID, default w4g32; writes OUT/results.json, prints markdown)"""
import json
import os
import sys

out, fp_name = sys.argv[1], "fp"
fp_grid = sys.argv[2] if len(sys.argv) > 2 else "w4g32"
rows = [json.load(open(f"{out}/rows/{f}")) for f in sorted(os.listdir(f"{out}/rows"))]
fp = next(r for r in rows if r["name"] == fp_name)
fp_text = json.load(open(f"{out}/runs/fp-text-fp.json"))["text_ppl"]
order = {"rtn": 0, "ste": 1, "prox-loss": 2, "prox-prox": 3, "prox-prox-q": 4}
grids = list(dict.fromkeys(r["grid"] for r in rows))
fmt = lambda x, f: "—" if x is None else f.format(x)
lines = [
    f"fp fine-tune: val loss {fp['val_fp']:.4f}, held-out text ppl {fp_text:.3f}, {fp['steps']} steps, {fp['wall_s']:.0f} s",
    *[f"distillation teacher (KD_TEACHER_STEPS): fp fine-tune of {t['steps']} steps, val loss {t['val_fp']:.4f}"
      for t in rows if t["name"] == "teacher"],
    "",
    "| grid | method | val loss fp weights | val loss hardened | ×fp | RTN gap recovered | text ppl hardened | hit rate | sat rate | wall s |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for g in grids:
    rtn = next((r for r in rows if r["grid"] == g and r["method"] == "rtn"), None)
    base = lambda m: m.split("@")[0].split("+")[0]  # METHOD[+lsM][@C]
    rows_g = [r for r in rows if r["grid"] == g and base(r["method"]) in order]
    for r in sorted(rows_g, key=lambda r: (order[base(r["method"])], r["method"])):
        gap = None
        if rtn and r["method"] != "rtn" and rtn["val_hard"] > fp["val_fp"]:
            gap = (rtn["val_hard"] - r["val_hard"]) / (rtn["val_hard"] - fp["val_fp"])
        r["rtn_gap_recovered"] = gap
        r["ratio_to_fp"] = r["val_hard"] / fp["val_fp"]
        lines.append(
            f"| {g} | {r['method']} | {r['val_fp']:.4f} | {r['val_hard']:.4f} | {r['ratio_to_fp']:.3f} | "
            f"{fmt(gap, '{:.0%}')} | {r['text_ppl_hard']:.3f} | {fmt(r['hit_rate'], '{:.3f}')} | "
            f"{fmt(r['sat_rate'], '{:.3f}')} | {r['wall_s']:.0f} |"
        )
rtn_best = {}  # per grid: the best-checkpoint table's RTN
if "best_val" in fp:
    # Best checkpoint by validation loss (evaluated every EVAL_EVERY steps). RTN is the teacher rounded
    # to the grid with fresh scales (w432.sh with KD_TEACHER_STEPS), else the fp run's best checkpoint
    # rounded (FP_GRID only), so an fp run that overfits late does not flatter the QAT rows.
    teacher_rtn = {g: f"{out}/runs/teacher-{g}-rtn-val.json" for g in grids}
    rtn_best = {g: json.load(open(p))["val_loss"] for g, p in teacher_rtn.items() if os.path.exists(p)}
    rtn_what = "the teacher rounded, scales fresh from its weights"
    if not rtn_best:
        rtn_best, rtn_what = {fp_grid: fp["best_val_q"]}, "the fp run's best checkpoint rounded"
    lines += [
        "",
        f"Best checkpoint by validation loss: fp {fp['best_val']:.4f} at step {fp['best_step']}; RTN ({rtn_what}) "
        + ", ".join(f"{g} {v:.4f}" for g, v in rtn_best.items()),
        "",
        "| grid | method | best step | val loss hardened | ×fp | RTN gap recovered | RTN gap, mean of the last quarter |",
        "|---|---|---|---|---|---|---|",
    ]
    gap = lambda val, rtn: (rtn - val) / (rtn - fp["best_val"])
    for r in rows:
        if "best_val" not in r or r["method"] in ("fp", "rtn") or r["grid"] not in rtn_best:
            continue
        rtn = rtn_best[r["grid"]]
        r["best_rtn_gap_recovered"] = gap(r["best_val"], rtn)
        r["late_rtn_gap_recovered"] = gap(r["late_val"], rtn) if "late_val" in r else None
        lines.append(
            f"| {r['grid']} | {r['method']} | {r['best_step']} | {r['best_val']:.4f} | "
            f"{r['best_val'] / fp['best_val']:.3f} | {r['best_rtn_gap_recovered']:.1%} | "
            f"{fmt(r['late_rtn_gap_recovered'], '{:.1%}')} |"
        )
json.dump({"fp": fp, "fp_text_ppl": fp_text, "rtn_best": rtn_best, "rows": rows}, open(f"{out}/results.json", "w"), indent=1)
print("\n".join(lines))
