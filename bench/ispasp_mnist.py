#!/usr/bin/env python3
"""i-SpaSP experiment 2 (issue 4): two-layer MLPs on MNIST at several hidden widths and
keep ratios; i-SpaSP vs activation-L1 vs weight-L1 vs random, accuracy right after pruning
and after one fine-tuning epoch. Dense MLPs: 2 epochs SGD (lr 0.05, batch 64, seed 0).
Writes docs/results/ispasp_mnist.{json,md}. Usage: python3 bench/ispasp_mnist.py"""
import json, os, subprocess, sys, time

L = "target/release/lopper"
WIDTHS = [256, 512, 1024]
KEEPS = [1 / 32, 1 / 16, 1 / 8, 1 / 4]
METHODS = [("ispasp", "i-SpaSP"), ("act-mean", "activation-L1"), ("l1", "weight-L1"), ("random", "random")]
SEEDS = [0, 1]

def run(args):
    out = subprocess.run([L] + args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    return out.stdout

def main():
    os.makedirs("runs", exist_ok=True)
    os.makedirs("docs/results", exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "-q"], check=True)
    rows = []
    for w in WIDTHS:
        model = f"runs/mlp{w}-mnist.safetensors"
        if not os.path.exists(model):
            run(["train", f"mlp:784-{w}-10", "--data", "mnist", "--epochs", "2", "--lr", "0.05",
                 "--batch-size", "64", "--seed", "0", "-o", model])
        for k in KEEPS:
            for m, label in METHODS:
                for seed in SEEDS:
                    t = time.time()
                    r = json.loads(run(["prune", model, "--data", "mnist", "--method", m,
                                        "--remove-channels", str(1 - k), "--finetune-epochs", "1", "--lr", "0.02",
                                        "--batch-size", "64", "--seed", str(seed), "--json"]))
                    rows.append(dict(width=w, keep=k, method=label, seed=seed, dense=r["dense"]["top1"],
                                     pruned=r["top1_before_finetune"], finetuned=r["result"]["top1"],
                                     kept=r["layers"][0]["width_after"], prune_s=r["seconds"]["method"],
                                     wall_s=time.time() - t))
                    print(rows[-1], flush=True)
    json.dump(rows, open("docs/results/ispasp_mnist.json", "w"), indent=1)
    md = ["# i-SpaSP on MNIST two-layer MLPs (784-w-10)", "",
          f"Mean over seeds {SEEDS} (selection sample / fine-tuning order). Top-1 % on the 10,000 test images:",
          "pruned (no fine-tuning) / after 1 fine-tuning epoch (lr 0.02 cosine, batch 64).", "",
          "| width | dense | kept | " + " | ".join(l for _, l in METHODS) + " |",
          "|---|---|---|" + "---|" * len(METHODS)]
    for w in WIDTHS:
        for k in KEEPS:
            cells = []
            for _, label in METHODS:
                rs = [r for r in rows if r["width"] == w and r["keep"] == k and r["method"] == label]
                p = sum(r["pruned"] for r in rs) / len(rs) * 100
                f = sum(r["finetuned"] for r in rs) / len(rs) * 100
                cells.append(f"{p:.2f} / {f:.2f}")
            dense = rows[[r["width"] for r in rows].index(w)]["dense"] * 100
            md.append(f"| {w} | {dense:.2f} | {int(w * k)} | " + " | ".join(cells) + " |")
    sel = [r["prune_s"] for r in rows if r["method"] == "i-SpaSP"]
    md += ["", f"i-SpaSP selection time (1,280 samples, T = 20): {min(sel):.3f}–{max(sel):.3f} s per model."]
    open("docs/results/ispasp_mnist.md", "w").write("\n".join(md) + "\n")
    print("\n".join(md))

if __name__ == "__main__":
    main()
