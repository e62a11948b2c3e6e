#!/usr/bin/env python3
"""Builds the post-training sparsity table from runs/sparsity/*.json
(bench/sparsity_resnet20.sh) into docs/results/sparsity_resnet20.md and .json.
Usage: sparsity_table.py [RUN_DIR [OUTPUT_NAME]] (defaults: runs/sparsity, sparsity_resnet20)."""
import json, os, sys, glob

root = os.path.join(os.path.dirname(__file__), "..")
src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "runs", "sparsity")
name = sys.argv[2] if len(sys.argv) > 2 else "sparsity_resnet20"
methods = [
    ("magnitude", "uniform magnitude + BN recalibration"),
    ("global", "global magnitude + BN recalibration"),
    ("wanda", "Wanda + BN recalibration"),
    ("pot", "POT (5 tuning iterations / level)"),
    ("unipts", "**UniPTS** (search + base decay + DST)"),
    ("unipts-nosearch", "UniPTS, no search (uniform [P] genome)"),
    ("unipts-nobasedecay", "UniPTS, no base decay (τ = 8)"),
    ("unipts-static", "UniPTS, no DST (static mask)"),
]
levels = ["0.5", "0.7", "0.8", "0.9"]
rows, raw = [], {}
dense = None
for m, label in methods:
    cells, times = [], []
    for s in levels:
        f = os.path.join(src, f"{m}_{s}.json")
        if not os.path.exists(f):
            cells.append("—"); times.append("—"); continue
        r = json.load(open(f))
        raw[f"{m}_{s}"] = dict(acc_dense=r["dense"]["top1"], acc_sparse=r["result"]["top1"],
                               sparsity=r["result"]["sparsity"], seconds=r["seconds"]["method"],
                               sparse_macs=r["result"]["nonzero_macs"], dense_macs=r["dense"]["macs"])
        dense = r["dense"]["top1"]
        cells.append(f"{100*r['result']['top1']:.2f}")
        times.append(f"{r['seconds']['method']:.0f}")
    rows.append((label, cells, times))
out = []
out.append(f"Dense ResNet-20: {100*dense:.2f} % top-1 on the CIFAR-10 (JPEG q75) test set." if dense else "")
out.append("")
out.append("| method | " + " | ".join(f"{int(float(s)*100)} %" for s in levels) + " | wall s (" + "/".join(f"{int(float(s)*100)}" for s in levels) + ") |")
out.append("|---|" + "---|" * len(levels) + "---|")
for label, cells, times in rows:
    out.append(f"| {label} | " + " | ".join(cells) + " | " + " / ".join(times) + " |")
text = "\n".join(out) + "\n"
os.makedirs(os.path.join(root, "docs", "results"), exist_ok=True)
open(os.path.join(root, "docs", "results", name + ".md"), "w").write(text)
json.dump(raw, open(os.path.join(root, "docs", "results", name + ".json"), "w"), indent=1)
print(text)
