#!/usr/bin/env python3
"""PyTorch side of `lopper bench`: the same workloads, timed the same way.

ResNet-20 (CIFAR, option-A shortcuts, BN) train step (SGD momentum 0.9, wd 5e-4) at
batch 64, inference at batch 64 and 1, and MLP 784-1024-1024-10 train step at batch 128.
Median over --steps timed steps after --warmup steps; peak RSS per workload (each runs
in its own subprocess, so ru_maxrss is that workload's peak).

    pip install torch numpy
    python3 bench/pytorch_bench.py [--steps 30] [--warmup 5] [--json]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

WORKLOADS = ["resnet20_train_b64", "resnet20_infer_b64", "resnet20_infer_b1", "mlp_train_b128"]


def build_resnet20(torch):
    nn = torch.nn
    F = torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.pad = cout - cin
            self.stride = stride

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            s = x
            if self.stride != 1 or self.pad:
                s = x[:, :, :: self.stride, :: self.stride]
                s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(y + s)

    class ResNet(nn.Module):
        def __init__(self, n=3):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            layers, cin = [], 16
            for s, cout in enumerate([16, 32, 64]):
                for i in range(n):
                    layers.append(Block(cin, cout, 2 if s > 0 and i == 0 else 1))
                    cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layers(x)
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.fc(x)

    return ResNet()


def run_one(name, steps, warmup):
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if name.startswith("resnet20"):
        model = build_resnet20(torch)
        b = 64 if name.endswith("b64") else 1
        x = torch.randn(b, 3, 32, 32)
    else:
        model = torch.nn.Sequential(
            torch.nn.Linear(784, 1024), torch.nn.ReLU(),
            torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
            torch.nn.Linear(1024, 10))
        b = 128
        x = torch.randn(b, 784)
    y = torch.arange(b) % 10
    if "train" in name:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)
        if b == 1:
            steps *= 5
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {
        "name": name,
        "median_ms": times[len(times) // 2],
        "min_ms": times[0],
        "max_ms": times[-1],
        "steps": steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only")
    a = ap.parse_args()
    if a.only:
        print(json.dumps(run_one(a.only, a.steps, a.warmup)))
        return
    rows = []
    for w in WORKLOADS:
        out = subprocess.run([sys.executable, __file__, "--only", w, "--steps", str(a.steps),
                              "--warmup", str(a.warmup)], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        if not a.json:
            print(f"{r['name']:<22} {r['median_ms']:>10.2f} {r['min_ms']:>10.2f} {r['max_ms']:>10.2f} "
                  f"{r['steps']:>6} {r['peak_rss_mb']:>12.0f}", flush=True)
    if a.json:
        import torch
        print(json.dumps({"backend": f"pytorch {torch.__version__}", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
