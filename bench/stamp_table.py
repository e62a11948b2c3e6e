#!/usr/bin/env python3
"""Table and accuracy-vs-time plot for bench/stamp_fmnist_mnist.sh (default: runs/stamp →
docs/results/stamp_fmnist_mnist.{md,svg}) or bench/stamp_cifar.sh
(`bench/stamp_table.py runs/stamp-cifar stamp_cifar`). TARGET_ACC sets the fixed accuracy."""
import json, os, sys
root = os.path.join(os.path.dirname(__file__), "..")
src = os.path.join(root, sys.argv[1]) if len(sys.argv) > 1 else os.path.join(root, "runs", "stamp")
name_out = sys.argv[2] if len(sys.argv) > 2 else "stamp_fmnist_mnist"
target = float(os.environ.get("TARGET_ACC", "0.97"))
rows, series = [], []
meta = json.load(open(os.path.join(src, "meta.json")))
for name, label, short in [("stamp", "STAMP (meta-trained generator)", "STAMP"), ("scratch", "(a) dense, from scratch", "(a) dense, scratch"),
                    ("l1", "(b) L1 prune of the reference + training", "(b) L1 + training"),
                    ("random", "random channels (uniform ratio) of the reference + training", "random (uniform)"),
                    ("random-widths", "(c) random channels at STAMP's widths + training", "(c) random, STAMP widths")]:
    f = os.path.join(src, f"{name}.json")
    if not os.path.exists(f):
        continue
    r = json.load(open(f))
    t, pts, reach, ep = r["seconds"]["method"], [(r["seconds"]["method"], r.get("top1_before_finetune") or 0.0)], None, None
    for i, e in enumerate(r.get("finetune_history") or []):
        t += e["seconds"]
        pts.append((t, e["test_top1"]))
        if reach is None and e["test_top1"] >= target:
            reach, ep = t, i + 1
    rows.append((label, (r["result"]["macs"] / r["dense"]["macs"]), r["result"]["params"], r["top1_before_finetune"], r["result"]["top1"], r["seconds"]["method"], t, reach, ep))
    series.append((short, pts))
out = [f"Meta-training: {meta['seconds']:.0f} s ({len(meta['history'])} iterations), not included below.", "",
       f"| method | MACs (of dense) | params | top-1 before training | top-1 after training | prune s | total s | s to {100*target:g} % | epochs to {100*target:g} % |",
       "|---|---|---|---|---|---|---|---|---|"]
for l, m, p, a0, a1, ps, tt, rc, ep in rows:
    out.append(f"| {l} | {100*m:.1f} % | {p} | {100*(a0 or 0):.2f} | {100*a1:.2f} | {ps:.2f} | {tt:.1f} | {'—' if rc is None else f'{rc:.1f}'} | {'—' if ep is None else ep} |")
text = "\n".join(out) + "\n"
os.makedirs(os.path.join(root, "docs", "results"), exist_ok=True)
open(os.path.join(root, "docs", "results", f"{name_out}.md"), "w").write(text)
# SVG: accuracy vs wall time.
W, H, l, r, t, b = 760, 440, 70, 200, 40, 55
xs = [x for _, p in series for x, _ in p]
# The y range starts a little under the worst accuracy after one epoch (the untrained
# points are drawn on the axis) so the differences between methods stay visible.
trained = [y for _, p in series for _, y in p[1:]]
x1 = max(xs) if xs else 1
y0, y1 = max(0.0, (int(min(trained) * 20) / 20.0) if trained else 0.0), 1.0
series = [(n, [(x, max(y, y0)) for x, y in p]) for n, p in series]
px = lambda x: l + x / x1 * (W - l - r); py = lambda y: H - b - (y - y0) / (y1 - y0) * (H - t - b)
pal = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>',
       f'<text x="{(W-r+l)/2}" y="22" text-anchor="middle" font-size="15">Target test accuracy vs wall time (pruning + training)</text>',
       f'<line x1="{l}" y1="{H-b}" x2="{W-r}" y2="{H-b}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{H-b}" stroke="black"/>']
for i in range(6):
    xv, yv = x1 * i / 5, y0 + (y1 - y0) * i / 5
    svg.append(f'<text x="{px(xv):.1f}" y="{H-b+16}" text-anchor="middle">{xv:.0f}</text><text x="{l-6}" y="{py(yv)+4:.1f}" text-anchor="end">{100*yv:.0f}</text>')
svg.append(f'<text x="{(W-r+l)/2}" y="{H-12}" text-anchor="middle">seconds</text><text x="16" y="{(H-b+t)/2}" transform="rotate(-90 16 {(H-b+t)/2})" text-anchor="middle">top-1 %</text>')
for i, (name, pts) in enumerate(series):
    c = pal[i % len(pal)]
    svg.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="' + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts) + '"/>')
    svg.append(f'<rect x="{W-r+10}" y="{t+16*i}" width="12" height="4" fill="{c}"/><text x="{W-r+28}" y="{t+16*i+6}">{name}</text>')
svg.append("</svg>")
open(os.path.join(root, "docs", "results", f"{name_out}.svg"), "w").write("\n".join(svg))
print(text)
