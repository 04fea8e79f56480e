#!/usr/bin/env python3
"""The w432.sh table: per grid, fp / RTN / STE / Prox-QAT rows and the fraction of the RTN gap each
recovers, (val_RTN − val_method) / (val_RTN − val_fp), on hardened validation loss.
usage: summarize.py OUT   (the fp run is the row named "fp"; writes OUT/results.json, prints markdown)"""
import json
import os
import sys

out, fp_name = sys.argv[1], "fp"
rows = [json.load(open(f"{out}/rows/{f}")) for f in sorted(os.listdir(f"{out}/rows"))]
fp = next(r for r in rows if r["name"] == fp_name)
fp_text = json.load(open(f"{out}/runs/fp-text-fp.json"))["text_ppl"]
order = {"rtn": 0, "ste": 1, "prox-loss": 2, "prox-prox": 3, "prox-prox-q": 4}
grids = list(dict.fromkeys(r["grid"] for r in rows))
fmt = lambda x, f: "—" if x is None else f.format(x)
lines = [
    f"fp fine-tune: val loss {fp['val_fp']:.4f}, held-out text ppl {fp_text:.3f}, {fp['steps']} steps, {fp['wall_s']:.0f} s",
    "",
    "| grid | method | val loss fp weights | val loss hardened | ×fp | RTN gap recovered | text ppl hardened | hit rate | sat rate | wall s |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for g in grids:
    rtn = next((r for r in rows if r["grid"] == g and r["method"] == "rtn"), None)
    rows_g = [r for r in rows if r["grid"] == g and r["method"].split("@")[0] in order]
    for r in sorted(rows_g, key=lambda r: (order[r["method"].split("@")[0]], r["method"])):
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
json.dump({"fp": fp, "fp_text_ppl": fp_text, "rows": rows}, open(f"{out}/results.json", "w"), indent=1)
print("\n".join(lines))
