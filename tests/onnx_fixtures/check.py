#!/usr/bin/env python3
"""ONNX round trip against onnxruntime (issue 8), on models exported by PyTorch.

For ResNet-18, MobileNetV2, DenseNet-121, ShuffleNetV2 (torchvision, random init, 10
classes; ShuffleNet exercises Split and channel shuffles) and a squeeze-excitation net, at 3x64x64: export with torch.onnx (opset 17), import with lopper
and compare its forward with onnxruntime (1e-4), prune to ~50 % MACs through the dependency
groups (`lopper prune --data none --method l1`), export the pruned graph, and check that
onnxruntime runs it with outputs equal to lopper's forward of the pruned graph (1e-4) and
lower latency than the dense export. The generated .onnx files stay in a temp dir (not git).

Usage: python3 tests/onnx_fixtures/check.py [--report docs/results/onnx_fixtures.md]
Installs the pinned packages below with pip if they are missing."""
import importlib.util, json, os, subprocess, sys, tempfile, time

PINS = {"torch": "2.15.0", "torchvision": "0.29.2", "onnx": "1.23.2", "onnxruntime": "1.31.1"}
missing = [f"{k}=={v}" for k, v in PINS.items() if importlib.util.find_spec(k) is None]
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q"] + missing, check=True)

import numpy as np, onnxruntime as ort, torch, torch.nn as nn, torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
L = os.path.join(ROOT, "target", "release", "lopper")


class SENet(nn.Module):
    """conv-bn-relu stem, two SE blocks (GAP → 1x1 conv → ReLU → 1x1 conv → sigmoid → Mul)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for w in (32, 64):
            layers += [nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
            layers.append(SE(c))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


def models():
    torch.manual_seed(0)
    tv = torchvision.models
    return {"resnet18": tv.resnet18(num_classes=10), "mobilenet_v2": tv.mobilenet_v2(num_classes=10),
            "densenet121": tv.densenet121(num_classes=10), "shufflenet_v2": tv.shufflenet_v2_x1_0(num_classes=10),
            "se_net": SENet()}


def randomise_bn(m):
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():  # noqa: B007
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def lopper(*args):
    r = subprocess.run([L] + list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"lopper {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def lopper_forward(model, x, d):
    xi, yo = os.path.join(d, "x.f32"), os.path.join(d, "y.f32")
    x.astype("<f4").tofile(xi)
    lopper("forward", model, "--input", xi, "-o", yo)
    return np.fromfile(yo, dtype="<f4").reshape(x.shape[0], -1)


def ort_session(path):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def ort_run(path, x):
    s = ort_session(path)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def latency(path, x, reps=30):
    s = ort_session(path)
    feed = {s.get_inputs()[0].name: x}
    for _ in range(3):
        s.run(None, feed)
    t = []
    for _ in range(reps):
        a = time.perf_counter()
        s.run(None, feed)
        t.append((time.perf_counter() - a) * 1e3)
    return min(t)  # the least disturbed run: robust on a shared machine


def close(a, b):
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def main():
    report = sys.argv[sys.argv.index("--report") + 1] if "--report" in sys.argv else None
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    rows, failures = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        only = os.environ.get("ONLY")
        for name, m in models().items():
            if only and name != only:
                continue
            randomise_bn(m)
            m.eval()
            dense = os.path.join(d, f"{name}.onnx")
            with torch.no_grad():
                torch.onnx.export(m, torch.randn(1, 3, 64, 64), dense, opset_version=17,
                                  input_names=["input"], output_names=["logits"], dynamo=False,
                                  dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
            x = rng.standard_normal((4, 3, 64, 64), dtype=np.float32)
            err_import = close(lopper_forward(dense, x, d), ort_run(dense, x))
            pruned_st = os.path.join(d, f"{name}-pruned.safetensors")
            pruned = os.path.join(d, f"{name}-pruned.onnx")
            # Widths in multiples of 8 keep onnxruntime's blocked (NCHWc) kernels; the tiny SE
            # net (32/64 channels) uses 4 so that 50 % MACs stays reachable.
            round_to = "4" if name == "se_net" else "8"
            rep = json.loads(lopper("prune", dense, "--data", "none", "--method", "l1", "--target-macs",
                                    "0.5", "--round-to", round_to, "-o", pruned_st, "--json"))
            lopper("convert", pruned_st, "-o", pruned)
            err_pruned = close(ort_run(pruned, x), lopper_forward(pruned_st, x, d))
            xb = rng.standard_normal((8, 3, 64, 64), dtype=np.float32)
            lat_d, lat_p = latency(dense, xb), latency(pruned, xb)
            row = dict(model=name, import_err=err_import, pruned_err=err_pruned, macs_ratio=rep["macs_ratio"],
                       params=(rep["dense"]["params"], rep["pruned"]["params"]), ort_ms=(lat_d, lat_p))
            rows.append(row)
            print(row, flush=True)
            # Sub-millisecond models are timer noise; their latency is reported, not checked.
            slower = lat_p >= lat_d and lat_d >= 1.0
            if err_import > 1e-4 or err_pruned > 1e-4 or slower or not 0.4 <= rep["macs_ratio"] <= 0.5:
                failures.append(name)
    lines = ["| model | lopper vs onnxruntime (dense) | MACs after pruning | params | pruned export vs lopper | onnxruntime b8 latency dense → pruned |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['import_err']:.1e} | {r['macs_ratio'] * 100:.1f} % | "
                     f"{r['params'][0] / 1e6:.2f} M → {r['params'][1] / 1e6:.2f} M | {r['pruned_err']:.1e} | "
                     f"{r['ort_ms'][0]:.1f} → {r['ort_ms'][1]:.1f} ms |")
    print("\n".join(lines))
    if report:
        hdr = (f"# ONNX round trip against onnxruntime\n\n`python3 tests/onnx_fixtures/check.py` — torch {torch.__version__}, "
               f"torchvision {torchvision.__version__}, onnxruntime {ort.__version__}; inputs 3x64x64, random init with "
               "randomised BN; pruned with L1, local scope, widths rounded to 8 (4 for the SE net); errors are max "
               "|difference| / max(1, max |reference|); latency: fastest of 30 runs, batch 8, 2 threads.\n\n")
        open(report, "w").write(hdr + "\n".join(lines) + "\n")
    if failures:
        raise SystemExit(f"failed: {failures}")


if __name__ == "__main__":
    main()
