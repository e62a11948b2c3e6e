#!/usr/bin/env python3
"""The side-by-side speed suite (issue 17): lopper vs PyTorch vs onnxruntime on the same
models, alternated in one sitting, with ratios and peak RSS.

Each model is defined once, in PyTorch (random weights; speed does not depend on them),
and exported to ONNX with the TorchScript exporter (symbolic batch). lopper times the
imported ONNX file (`lopper bench --model F.onnx`), onnxruntime the same file, PyTorch the
module itself: the three run identical graphs by construction. Every measurement runs in
its own process (so each peak RSS is that workload's own) and the three backends take
turns, ROUNDS times; the table shows the median of the per-round medians.

Workloads: train step (forward, cross-entropy, backward, SGD momentum) and inference at
b1 and b64 for the CIFAR-sized models (MLP 784-1024-1024-10, LeNet-5, the digit CNN,
VGG-11, ResNet-20, ResNet-56, MobileNetV2); inference at b1 and b8 at 224×224 for
torchvision's ResNet-18, ResNet-50, MobileNetV3-small/large and EfficientNet-B0. For each
model, the same model pruned to 50 % MACs by `lopper prune --method l1 --round-to 8`:
latency pruned/dense in lopper and in onnxruntime on the exported ONNX.

    python3 bench/suite.py [--rounds 2] [--steps 20] [--only resnet20,mlp] [--no-train]
        [--no-prune] [--report BENCHMARKS-suite.md]

Outside a virtual environment with the packages missing, it creates target/suite-venv and
installs the pinned packages there (an install step of this script, not a CI dependency).
"""
import argparse, importlib.util, json, os, platform, resource, statistics, subprocess, sys, time, warnings

PINS = {"torch": "2.15.0", "torchvision": "0.29.2", "onnx": "1.23.2", "onnxruntime": "1.31.1",
        "onnxscript": "0.7.2"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "suite")
LOPPER = os.path.join(ROOT, "target", "release", "lopper")


def ensure_packages():
    missing = [f"{k}=={v}" for k, v in PINS.items() if importlib.util.find_spec(k) is None]
    if missing and sys.prefix == sys.base_prefix:
        venv = os.path.join(ROOT, "target", "suite-venv")
        py = os.path.join(venv, "bin", "python")
        if not os.path.exists(py):
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        os.execv(py, [py] + sys.argv)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q"] + missing, check=True)


# ---------------------------------------------------------------- models (PyTorch)

def cifar_models(torch):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        """ResNet basic block, option-A (zero-padded, strided identity) shortcut."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.pad, self.stride = cout - cin, stride

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            s = x
            if self.stride != 1 or self.pad:
                s = F.pad(x[:, :, ::self.stride, ::self.stride],
                          (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(y + s)

    def resnet(depth):
        n = (depth - 2) // 6
        layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
        for s, cout in enumerate([16, 32, 64]):
            for i in range(n):
                layers.append(Block(cin, cout, 2 if s > 0 and i == 0 else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
        return nn.Sequential(*layers)

    def vgg11():
        layers, c = [], 3
        for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 10))

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            h = cin * t
            layers = [] if t == 1 else [nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6()]
            layers += [nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                       nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body, self.res = nn.Sequential(*layers), stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.res else self.body(x)

    def mobilenetv2():
        """MobileNetV2 for 32×32 (stem and first downsampling at stride 1)."""
        cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1)]
        layers, c = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()], 32
        for t, cout, n, s in cfg:
            for i in range(n):
                layers.append(Inverted(c, cout, s if i == 0 else 1, t))
                c = cout
        layers += [nn.Conv2d(c, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(),
                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 10)]
        return nn.Sequential(*layers)

    def lenet5():
        return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    def digit_cnn():
        """The digit-recognizer CNN shape: convs with bias and no batch norm, max pooling."""
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(64 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))

    def mlp():
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))

    return {
        "mlp": (mlp, (784,)), "lenet5": (lenet5, (1, 28, 28)), "digit_cnn": (digit_cnn, (1, 28, 28)),
        "vgg11": (vgg11, (3, 32, 32)), "resnet20": (lambda: resnet(20), (3, 32, 32)),
        "resnet56": (lambda: resnet(56), (3, 32, 32)), "mobilenetv2": (mobilenetv2, (3, 32, 32)),
    }


def imagenet_models(torchvision):
    tv = torchvision.models
    from torchvision.models.vision_transformer import VisionTransformer
    return {
        # lopper's zoo `vit` shape (dim 128, 6 blocks of 4 heads, patch 4, FFN 256) with
        # torchvision's class token: imported from ONNX like every other workload.
        "vit": (lambda: VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=4,
                                          hidden_dim=128, mlp_dim=256, num_classes=10), (3, 32, 32)),
        "vit_b_16": (tv.vit_b_16, (3, 224, 224)),
        "resnet18": (tv.resnet18, (3, 224, 224)), "resnet50": (tv.resnet50, (3, 224, 224)),
        "mobilenet_v3_small": (tv.mobilenet_v3_small, (3, 224, 224)),
        "mobilenet_v3_large": (tv.mobilenet_v3_large, (3, 224, 224)),
        "efficientnet_b0": (tv.efficientnet_b0, (3, 224, 224)),
    }


def all_models():
    import torch, torchvision
    m = cifar_models(torch)
    m.update(imagenet_models(torchvision))
    return m


CIFAR = ["mlp", "lenet5", "digit_cnn", "vgg11", "resnet20", "resnet56", "mobilenetv2", "vit"]
IMAGENET = ["resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
            "vit_b_16"]


def build(name):
    import torch
    torch.manual_seed(0)
    make, shape = all_models()[name]
    return make(), shape


def export(name):
    """target/suite/NAME.onnx (TorchScript exporter, opset 17, symbolic batch)."""
    import torch
    path = os.path.join(OUT, f"{name}.onnx")
    if os.path.exists(path):
        return path
    m, shape = build(name)
    m.eval()
    x = torch.randn(1, *shape)
    os.makedirs(OUT, exist_ok=True)
    tmp = path + ".tmp"
    # Not under no_grad: there nn.MultiheadAttention takes a fused path the TorchScript
    # exporter cannot write (the exported graph is the same for every other model).
    torch.onnx.export(m, x, tmp, opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamo=False, dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- workers (one process each)

def reset_peak():
    """ru_maxrss survives exec (the parent's high-water mark would show): reset this
    process's own mark and read VmHWM instead."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def timed(f, steps, warmup):
    for _ in range(warmup):
        f()
    t = []
    for _ in range(steps):
        a = time.perf_counter()
        f()
        t.append((time.perf_counter() - a) * 1e3)
    return statistics.median(t)


def worker_torch(name, mode, batch, steps, warmup):
    import torch
    torch.set_num_threads(2)
    m, shape = build(name)
    x = torch.randn(batch, *shape)
    if mode == "train":
        m.train()
        y = torch.arange(batch) % 10
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        ms = timed(step, steps, warmup)
    else:
        m.eval()
        with torch.inference_mode():
            ms = timed(lambda: m(x), steps, warmup)
    return ms


def worker_ort(path, batch, steps, warmup):
    import numpy as np, onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    o.inter_op_num_threads = 1
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, *i.shape[1:])).astype(np.float32)
    return timed(lambda: s.run(None, {i.name: x}), steps, warmup)


def run_json(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def measure(backend, name, path, mode, batch, steps, warmup):
    """One measurement in its own process: (median ms, peak RSS MB)."""
    steps = steps * 5 if batch == 1 and mode == "infer" else steps
    if backend == "lopper":
        cmd = [LOPPER, "bench", "--model", path, "--batch", str(batch), "--steps", str(steps), "--warmup",
               str(warmup), "--json"] + (["--train"] if mode == "train" else [])
        # lopper multiplies b1 steps by 5 itself.
        if batch == 1 and mode == "infer":
            cmd[cmd.index("--steps") + 1] = str(steps // 5)
        r = run_json(cmd)["rows"][0]
        return r["median_ms"], r["peak_rss_mb"]
    cmd = [sys.executable, __file__, "--warmup", str(warmup), "--worker", backend, name, path, mode, str(batch),
           str(steps)]
    r = run_json(cmd)
    return r["ms"], r["rss"]


def prune(name, path):
    """NAME-p50.onnx: L1, local, at most 50 % of the MACs, widths rounded to 8."""
    out = os.path.join(OUT, f"{name}-p50.onnx")
    st = os.path.join(OUT, f"{name}-p50.safetensors")
    r = subprocess.run([LOPPER, "prune", path, "--data", "none", "--method", "l1", "--keep-macs", "0.5",
                        "--round-to", "8", "-o", st, "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    rep = json.loads(r.stdout)
    subprocess.run([LOPPER, "convert", st, "-o", out], check=True, capture_output=True)
    return out, rep


def cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-prune", action="store_true")
    ap.add_argument("--report", default="")
    ap.add_argument("--lopper", default=LOPPER, help="the lopper binary (default target/release/lopper)")
    ap.add_argument("--worker", nargs=6)
    a = ap.parse_args()
    if a.worker:
        backend, name, path, mode, batch, steps = a.worker
        steps, batch = int(steps), int(batch)
        reset_peak()
        ms = (worker_torch(name, mode, batch, steps, a.warmup) if backend == "torch"
              else worker_ort(path, batch, steps, a.warmup))
        print(json.dumps({"ms": ms, "rss": peak_mb()}))
        return
    ensure_packages()
    warnings.filterwarnings("ignore")
    globals()["LOPPER"] = os.path.abspath(a.lopper)
    import torch, onnxruntime
    names = [n for n in CIFAR + IMAGENET if not a.only or n in a.only.split(",")]
    rows, pruned_rows = [], []
    for name in names:
        path = export(name)
        big = name in IMAGENET
        work = [("infer", 1), ("infer", 8 if big else 64)]
        if not big and not a.no_train:
            work.insert(0, ("train", 128 if name == "mlp" else 64))
        for mode, batch in work:
            res = {b: [] for b in ("lopper", "torch", "ort")}
            for _ in range(a.rounds):
                for b in ("lopper", "torch", "ort"):
                    if b == "ort" and mode == "train":
                        continue
                    res[b].append(measure(b, name, path, mode, batch, a.steps, a.warmup))
            med = {b: (statistics.median(x[0] for x in v), max(x[1] for x in v)) if v else None
                   for b, v in res.items()}
            row = dict(workload=f"{name}_{mode}_b{batch}", **{b: med[b] for b in med})
            rows.append(row)
            print(fmt_row(row), flush=True)
        if not a.no_prune:
            try:
                ppath, rep = prune(name, path)
            except RuntimeError as e:
                print(f"{name}: prune failed: {str(e).splitlines()[-1]}", flush=True)
                continue
            batch = 8 if big else 64
            lat = {("lopper", "dense"): [], ("lopper", "pruned"): [], ("ort", "dense"): [], ("ort", "pruned"): []}
            for _ in range(a.rounds):
                for b in ("lopper", "ort"):
                    for k, p in (("dense", path), ("pruned", ppath)):
                        lat[(b, k)].append(measure(b, name, p, "infer", batch, a.steps, a.warmup)[0])
            m = {k: statistics.median(v) for k, v in lat.items()}
            macs = (rep["result"]["macs"] / rep["dense"]["macs"])
            pr = dict(model=name, batch=batch, macs=macs, **{f"{b}_{k}": v for (b, k), v in m.items()})
            pruned_rows.append(pr)
            print(fmt_pruned(pr), flush=True)
    head = (f"CPU: {cpu_model()}; {os.cpu_count()} threads; PyTorch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}; {a.rounds} rounds × {a.steps} steps; "
            f"command: python3 bench/suite.py --rounds {a.rounds} --steps {a.steps}"
            + (f" --only {a.only}" if a.only else ""))
    md = [head, "", "| workload | lopper ms | PyTorch ms | ort ms | lopper/PyTorch | lopper/ort | "
          "RSS MB lopper / PyTorch / ort |", "|---|---|---|---|---|---|---|"]
    md += [fmt_row(r) for r in rows]
    if pruned_rows:
        md += ["", "| model (L1, 50 % MACs, round 8) | batch | MACs kept | lopper dense ms | lopper pruned ms | "
               "lopper ratio | ort dense ms | ort pruned ms | ort ratio |", "|---|---|---|---|---|---|---|---|---|"]
        md += [fmt_pruned(r) for r in pruned_rows]
    print("\n".join(md))
    if a.report:
        tmp = a.report + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(md) + "\n")
        os.replace(tmp, a.report)


def fmt_row(r):
    def ms(b):
        return f"{r[b][0]:.2f}" if r[b] else "–"

    def ratio(b):
        return f"{r['lopper'][0] / r[b][0]:.2f}" if r[b] else "–"
    rss = " / ".join(f"{r[b][1]:.0f}" if r[b] else "–" for b in ("lopper", "torch", "ort"))
    return f"| {r['workload']} | {ms('lopper')} | {ms('torch')} | {ms('ort')} | {ratio('torch')} | {ratio('ort')} | {rss} |"


def fmt_pruned(r):
    return (f"| {r['model']} | {r['batch']} | {100 * r['macs']:.1f} % | {r['lopper_dense']:.2f} | "
            f"{r['lopper_pruned']:.2f} | {r['lopper_pruned'] / r['lopper_dense']:.2f} | {r['ort_dense']:.2f} | "
            f"{r['ort_pruned']:.2f} | {r['ort_pruned'] / r['ort_dense']:.2f} |")


if __name__ == "__main__":
    main()
