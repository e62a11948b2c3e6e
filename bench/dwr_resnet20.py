#!/usr/bin/env python3
"""DWR experiment (issue 7), reduced scale: ResNet-20 on CIFAR-10 JPEG, training on a seeded
10,000-image subset, accuracies on a 2,000-image test subset. Collection: iterative pruning
along each axis with 1 fine-tuning epoch per point (cached in runs/dwr-r20-points.json).
Then DWR (all axes) vs depth-only vs width-only vs resolution-only at the same exact MACs
budget (T = 0.5 and 0.3), each built from the dense model and fine-tuned identically.
Usage: python3 bench/dwr_resnet20.py MODEL [FINAL_EPOCHS] -> docs/results/dwr_resnet20.{json,md,svg}"""
import json, math, subprocess, sys, time

L = "target/release/lopper"
model = sys.argv[1]
epochs = sys.argv[2] if len(sys.argv) > 2 else "5"
common = ["--data", "cifar10", "--method", "dwr", "--train-limit", "10000", "--eval-limit", "2000",
          "--step-epochs", "1", "--finetune-epochs", epochs, "--lr", "0.01", "--batch-size", "128",
          "--seed", "0", "--dwr-cache", "runs/dwr-r20-points.json", "--json"]
rows = []
for t in ["0.5", "0.3"]:
    for axes in ["all", "depth", "width", "resolution"]:
        t0 = time.time()
        out = subprocess.run([L, "prune", model, "--keep-macs", t, "--dwr-axes", axes] + common,
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"T={t} {axes}: {out.stderr.strip()}", flush=True)
            rows.append(dict(t=float(t), axes=axes, error=out.stderr.strip().splitlines()[-1]))
            continue
        r = json.loads(out.stdout)
        d = r["details"]
        rows.append(dict(t=float(t), axes=axes, macs=r["result"]["macs"], macs_ratio=(r["result"]["macs"] / r["dense"]["macs"]),
                         params=r["result"]["params"], config=d["config"], predicted=d["predicted"],
                         acc_pruned=r["top1_before_finetune"], acc=r["result"]["top1"], dense=r["dense"]["top1"],
                         optimum=d["optimum"], degree=d["map"]["degree"], loo=d["loo"], map=d["map"],
                         points=d["points"], lat_b64=r["result"]["latency_b64_ms"],
                         dense_lat_b64=r["dense"]["latency_b64_ms"], wall_s=time.time() - t0,
                         ft_s=r["seconds"]["finetune"]))
        print(t, axes, rows[-1]["config"], rows[-1]["macs_ratio"], rows[-1]["predicted"], rows[-1]["acc"], flush=True)
json.dump(rows, open("docs/results/dwr_resnet20.json", "w"), indent=1)
ok = [r for r in rows if "acc" in r]
ref = ok[0]
pts = ref["points"]

def poly(c, x):
    return sum(ci * x ** i for i, ci in enumerate(c))

m = ref["map"]
F = lambda d, w, r: sum(poly(p, d) * poly(q, w) * poly(s, r) for p, q, s in zip(m["p"], m["q"], m["s"]))
# SVG: the predictor's three axis slices through (1,1,1) with the collected points.
W, H, l, b, top, right = 760, 420, 60, 50, 40, 170
ys = [p["point"]["acc"] for p in pts] + [F(x / 100, 1, 1) for x in range(30, 101)]
y0, y1 = min(ys) - 0.02, max(ys) + 0.02
px = lambda x: l + (x - 0.3) / 0.7 * (W - l - right)
py = lambda y: H - b - (y - y0) / (y1 - y0) * (H - top - b)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       '<rect width="100%" height="100%" fill="white"/>',
       f'<text x="{(W - right + l) / 2}" y="22" text-anchor="middle" font-size="15">DWR accuracy predictor, ResNet-20 / CIFAR-10 (degree {m["degree"]})</text>',
       f'<line x1="{l}" y1="{H - b}" x2="{W - right}" y2="{H - b}" stroke="black"/><line x1="{l}" y1="{top}" x2="{l}" y2="{H - b}" stroke="black"/>']
for i in range(8):
    x = 0.3 + 0.1 * i
    svg.append(f'<text x="{px(x):.1f}" y="{H - b + 16}" text-anchor="middle">{x:.1f}</text>')
for i in range(6):
    y = y0 + (y1 - y0) * i / 5
    svg.append(f'<line x1="{l}" y1="{py(y):.1f}" x2="{W - right}" y2="{py(y):.1f}" stroke="#ddd"/><text x="{l - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y * 100:.0f}%</text>')
svg.append(f'<text x="{(W - right + l) / 2}" y="{H - 10}" text-anchor="middle">normalised depth d / width w / resolution r (others at 1)</text>')
for k, (axis, col, f) in enumerate([("depth", "#1f77b4", lambda x: F(x, 1, 1)), ("width", "#ff7f0e", lambda x: F(1, x, 1)),
                                    ("resolution", "#2ca02c", lambda x: F(1, 1, x))]):
    line = " ".join(f"{px(x / 100):.1f},{py(f(x / 100)):.1f}" for x in range(30, 101))
    svg.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{line}"/>')
    coord = {"depth": "d", "width": "w", "resolution": "r"}[axis]
    for p in pts:
        if p["axis"] in (axis, "dense"):
            svg.append(f'<circle cx="{px(p["point"][coord]):.1f}" cy="{py(p["point"]["acc"]):.1f}" r="4" fill="{col}"/>')
    svg.append(f'<rect x="{W - right + 12}" y="{top + 16 * k}" width="12" height="4" fill="{col}"/><text x="{W - right + 30}" y="{top + 16 * k + 6}">F along {axis}</text>')
svg.append("</svg>")
open("docs/results/dwr_resnet20.svg", "w").write("\n".join(svg) + "\n")
md = ["# DWR on ResNet-20 / CIFAR-10 JPEG (reduced scale)", "",
      f"Dense `{model}`: top-1 {ref['dense'] * 100:.2f} % on the 2,000-image test subset. Training on a seeded 10,000-image",
      f"subset; collection: 1 fine-tuning epoch per point (lr 0.01, constant); final: {epochs} epochs, lr 0.01 cosine, batch 128, crop + flip.",
      "", f"Collected points ({len(pts)}):", "", "| axis | d | w | r | top-1 after 1 epoch | MACs |", "|---|---|---|---|---|---|"]
for p in pts:
    q = p["point"]
    md.append(f"| {p['axis']} | {q['d']:.3f} | {q['w']:.3f} | {q['r']:.3f} | {q['acc'] * 100:.2f} | {p['macs'] / 1e6:.2f} M |")
md += ["", f"Predictor: rank-1, degree {m['degree']} by leave-one-out ({', '.join(f'K={k}: {e:.4f}' for k, e in ref['loo'])}); fitted RMSE {m['rmse']:.4f}.",
       "", "| T | axes | config (blocks removed, width, px) | MACs | continuous optimum (d, w, r) | predicted | top-1 pruned | top-1 fine-tuned | b64 latency |",
       "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    if "acc" not in r:
        md.append(f"| {r['t']} | {r['axes']} | — | — | — | — | — | {r['error']} | — |")
        continue
    c, o = r["config"], r["optimum"]
    opt = f"({o['d']:.3f}, {o['w']:.3f}, {o['r']:.3f})" if r["axes"] == "all" else "—"
    md.append(f"| {r['t']} | {r['axes']} | {c['blocks_removed']}, {c['width']:.3f}, {c['px']} | {r['macs'] / 1e6:.2f} M ({r['macs_ratio'] * 100:.1f} %) | {opt} | "
              f"{r['predicted'] * 100:.2f} | {r['acc_pruned'] * 100:.2f} | {r['acc'] * 100:.2f} | {r['lat_b64']:.1f} ms (dense {r['dense_lat_b64']:.1f}) |")
open("docs/results/dwr_resnet20.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
