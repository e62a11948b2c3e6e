#!/usr/bin/env python3
"""Side-by-side kernel benchmark: runs `lopper bench` and bench/pytorch_bench.py alternately
ROUNDS times (so both see the same machine state) and prints the median of the per-round
medians, the ratio lopper/PyTorch and peak RSS, as a markdown table.

    python3 bench/compare.py [--rounds 3] [--steps 30]
"""
import argparse
import json
import statistics
import subprocess
import sys


def run(cmd):
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", default="30")
    ap.add_argument("--lopper", default="target/release/lopper")
    a = ap.parse_args()
    ours, theirs = {}, {}
    for _ in range(a.rounds):
        for r in run([a.lopper, "bench", "--steps", a.steps, "--json"])["rows"]:
            ours.setdefault(r["name"], []).append(r)
        t = run([sys.executable, "bench/pytorch_bench.py", "--steps", a.steps, "--json"])
        for r in t["rows"]:
            theirs.setdefault(r["name"], []).append(r)
    print(f"PyTorch: {t['backend']}")
    print("| workload | lopper median ms | PyTorch median ms | ratio | lopper peak RSS MB | PyTorch peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, rows in ours.items():
        m = statistics.median(r["median_ms"] for r in rows)
        rss = max(r["peak_rss_mb"] for r in rows)
        if name in theirs:
            tm = statistics.median(r["median_ms"] for r in theirs[name])
            trss = max(r["peak_rss_mb"] for r in theirs[name])
            print(f"| {name} | {m:.1f} | {tm:.1f} | {m / tm:.2f} | {rss:.0f} | {trss:.0f} |")
        else:
            print(f"| {name} | {m:.1f} | – | – | {rss:.0f} | – |")


if __name__ == "__main__":
    main()
