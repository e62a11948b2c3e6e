#!/usr/bin/env python3
"""Issue-3 comparison: the dense ResNet-20 (CIFAR-10 JPEG) pruned to ~2x fewer MACs with every
criterion, local and global scope, the same fine-tuning budget for all; prints a markdown table.

    python3 bench/prune_table.py MODEL.safetensors [--finetune-epochs 1] [--train-limit 20000]
"""
import argparse
import json
import subprocess
import time

CRITERIA = ["random", "l1", "l2", "fpgm", "bn-scale", "taylor", "act-mean", "apoz"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--lopper", default="target/release/lopper")
    ap.add_argument("--keep-macs", default="0.5")
    ap.add_argument("--finetune-epochs", default="1")
    ap.add_argument("--train-limit", default="20000")
    ap.add_argument("--lr", default="0.01")
    ap.add_argument("--out", default="runs/prune_table.json")
    a = ap.parse_args()
    rows = []
    for scope in ["local", "global"]:
        for crit in CRITERIA:
            t = time.time()
            out = subprocess.run(
                [a.lopper, "prune", a.model, "--data", "cifar10", "--method", crit, "--scope", scope,
                 "--keep-macs", a.target_macs, "--finetune-epochs", a.finetune_epochs,
                 "--train-limit", a.train_limit, "--lr", a.lr, "--calib", "512", "--json"],
                check=True, capture_output=True, text=True)
            r = json.loads(out.stdout)
            r["wall_seconds"] = time.time() - t
            rows.append(r)
            print(f"| {crit} | {scope} | {1 / (r['result']['macs'] / r['dense']['macs']):.2f}x | {100 * (r['result']['params'] / r['dense']['params']):.1f}% "
                  f"| {100 * r['dense']['top1']:.2f} | {100 * r['top1_before_finetune']:.2f} | {100 * r['result']['top1']:.2f} "
                  f"| {r['seconds']['method']:.1f} | {r['seconds']['finetune']:.0f} "
                  f"| {r['result']['latency_b64_ms'] / r['dense']['latency_b64_ms']:.2f} |", flush=True)
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
