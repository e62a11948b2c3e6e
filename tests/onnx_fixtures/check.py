#!/usr/bin/env python3
"""ONNX round trip against onnxruntime (issue 8), on models exported by PyTorch.

For torchvision classifiers (ResNet-18/50, MobileNetV2/V3, EfficientNet-B0, RegNetX, ConvNeXt-T,
DenseNet-121, ShuffleNetV2, SqueezeNet, GoogLeNet; random init, 10 classes), a
squeeze-excitation net, a CIFAR ResNet with option-A (strided-slice) shortcuts, a
UNet-style segmentation net, two torchvision segmentation models (FCN, DeepLabV3), two
torchvision detectors without post-processing (SSDlite, RetinaNet), a YOLO-style
multi-output detector and a two-input net, at 3x64x64, with both PyTorch exporters (the legacy TorchScript
one with a symbolic batch, and the default one, which fixes the batch to 1 and writes
external data): import with lopper
and compare its forward with onnxruntime (1e-4), prune to ~50 % MACs through the dependency
groups (`lopper prune --data none --method l1`), export the pruned graph, and check that
onnxruntime runs it with outputs equal to lopper's forward of the pruned graph (1e-4) and
lower latency than the dense export. The generated .onnx files stay in a temp dir (not git).

Usage: python3 tests/onnx_fixtures/check.py [--report docs/results/onnx_fixtures.md]
When the packages are missing outside a virtual environment, it creates one in
target/fixtures-venv and installs the pinned packages below there. ONLY="resnet18 se_net" and EXPORTERS="legacy" narrow the run."""
import importlib.util, json, os, subprocess, sys, tempfile, time, warnings

PINS = {"torch": "2.15.0", "torchvision": "0.29.2", "onnx": "1.23.2", "onnxruntime": "1.31.1", "onnxscript": "0.7.2"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
missing = [f"{k}=={v}" for k, v in PINS.items() if importlib.util.find_spec(k) is None]
if missing and sys.prefix == sys.base_prefix:
    # Packages missing and not in a virtual environment: make one under target/ (pinned
    # packages), re-run there.
    venv = os.path.join(ROOT, "target", "fixtures-venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    os.execv(py, [py] + sys.argv)
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q"] + missing, check=True)

warnings.filterwarnings("ignore")
import numpy as np, onnxruntime as ort, torch, torch.nn as nn, torchvision

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


class UNet(nn.Module):
    """A UNet-style segmentation net: two down steps, bilinear and nearest upsampling,
    skip concatenations, a 3-class per-pixel head."""

    def __init__(self, transposed=False):
        super().__init__()
        # Learned upsampling (ConvTranspose2d, k2 s2 and k3 s2 p1 op1) or interpolation.
        self.t2 = nn.ConvTranspose2d(64, 64, 2, 2) if transposed else None
        self.t1 = nn.ConvTranspose2d(32, 32, 3, 2, 1, output_padding=1) if transposed else None

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.e1, self.e2, self.mid = block(3, 16), block(16, 32), block(32, 64)
        self.d2, self.d1 = block(64 + 32, 32), block(32 + 16, 16)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(nn.functional.max_pool2d(e1, 2))
        m = self.mid(nn.functional.max_pool2d(e2, 2))
        u2 = self.t2(m) if self.t2 is not None else nn.functional.interpolate(
            m, scale_factor=2, mode="bilinear", align_corners=False)
        d2 = self.d2(torch.cat([u2, e2], 1))
        u1 = self.t1(d2) if self.t1 is not None else nn.functional.interpolate(d2, scale_factor=2, mode="nearest")
        return self.head(self.d1(torch.cat([u1, e1], 1)))


class PadNet(nn.Module):
    """Reflection, replication, zero and constant-value spatial padding before convs
    (image-to-image and TensorFlow-style nets)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3, 2), nn.Conv2d(32, 32, 3)
        self.reflect, self.edge = nn.ReflectionPad2d(1), nn.ReplicationPad2d(2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c1(self.reflect(x)))
        x = torch.relu(self.c2(self.edge(x)))
        x = torch.relu(self.c3(nn.functional.pad(x, (1, 2, 0, 1), value=0.5)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class OptionA(nn.Module):
    """A CIFAR ResNet basic block with the option-A shortcut: the identity subsampled by
    `x[:, :, ::2, ::2]` (exported as strided Slices) and zero-padded in channels."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.pad, self.stride = cout - cin, stride

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        s = x
        if self.stride != 1 or self.pad:
            s = nn.functional.pad(x[:, :, ::self.stride, ::self.stride],
                                  (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return torch.relu(y + s)


def resnet_option_a():
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
              OptionA(16, 16, 1), OptionA(16, 32, 2), OptionA(32, 64, 2),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


class Detector(nn.Module):
    """A torchvision detector without its post-processing (anchor decoding and NMS, which
    are not network layers): the backbone (with FPN or extra layers) and the heads, which
    reshape and permute each level's map to [N, anchors, K] and concatenate the levels.
    Outputs: box regression and class logits."""

    def __init__(self, det):
        super().__init__()
        self.backbone, self.head = det.backbone, det.head

    def forward(self, x):
        feats = self.backbone(x)
        feats = list(feats.values()) if isinstance(feats, dict) else [feats]
        out = self.head(feats)
        return out["bbox_regression"], out["cls_logits"]


class YoloHead(nn.Module):
    """A YOLO-style detector: a small CSP-less backbone, a top-down neck with nearest
    upsampling, element-wise max/min fusion, and three heads whose maps are viewed as
    [N, 3, K, H, W] and permuted to [N, 3, H, W, K] (one output per level)."""

    def __init__(self, k=9):
        super().__init__()

        def cbl(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.LeakyReLU(0.1))

        self.k = k
        self.s1, self.s2, self.s3 = cbl(3, 32, 2), cbl(32, 64, 2), cbl(64, 128, 2)
        self.s4, self.s5 = cbl(128, 128, 2), cbl(128, 128, 2)
        self.lat4, self.lat5 = nn.Conv2d(128, 128, 1), nn.Conv2d(128, 128, 1)
        self.heads = nn.ModuleList(nn.Conv2d(128, 3 * k, 1) for _ in range(3))

    def forward(self, x):
        c3 = self.s3(self.s2(self.s1(x)))
        c4 = self.s4(c3)
        c5 = self.s5(c4)
        up = nn.functional.interpolate
        p4 = torch.maximum(self.lat4(c4), up(self.lat5(c5), scale_factor=2.0, mode="nearest"))
        p3 = torch.minimum(c3, up(p4, scale_factor=2.0, mode="nearest")) + c3
        outs = []
        for h, f in zip(self.heads, (p3, p4, c5)):
            y = h(f)
            n, _, hh, ww = y.shape
            outs.append(y.view(n, 3, self.k, hh, ww).permute(0, 1, 3, 4, 2).contiguous())
        return tuple(outs)


class TwoInput(nn.Module):
    """Two inputs (an RGB image and a one-channel depth map at half resolution): a stem
    per input, the depth features upsampled and concatenated with the image's, a shared
    trunk and a classifier."""

    inputs = ((3, 64, 64), (1, 32, 32))

    def __init__(self):
        super().__init__()

        def cbr(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.rgb, self.depth = cbr(3, 32, 2), cbr(1, 16, 1)
        self.trunk = nn.Sequential(cbr(48, 64, 2), cbr(64, 64, 1))
        self.fc = nn.Linear(64, 10)

    def forward(self, x, d):
        f = torch.cat([self.rgb(x), self.depth(d)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.trunk(f), 1), 1))


def layer_scaled(m):
    """ConvNeXt initialises its layer scales to 1e-6 (blocks near identity): make them 0.5."""
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "layer_scale"):
                mod.layer_scale.fill_(0.5)
    return m


def models():
    tv = torchvision.models
    seg = torchvision.models.segmentation
    det = torchvision.models.detection
    return {
        "resnet18": lambda: tv.resnet18(num_classes=10),
        "resnet50": lambda: tv.resnet50(num_classes=10),
        "mobilenet_v2": lambda: tv.mobilenet_v2(num_classes=10),
        "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(num_classes=10),
        "mobilenet_v3_large": lambda: tv.mobilenet_v3_large(num_classes=10),
        "efficientnet_b0": lambda: tv.efficientnet_b0(num_classes=10),
        "regnet_x_400mf": lambda: tv.regnet_x_400mf(num_classes=10),
        "densenet121": lambda: tv.densenet121(num_classes=10),
        "shufflenet_v2": lambda: tv.shufflenet_v2_x1_0(num_classes=10),
        "squeezenet1_0": lambda: tv.squeezenet1_0(num_classes=10),
        "googlenet": lambda: tv.googlenet(num_classes=10, aux_logits=False, init_weights=True),
        # Channels-last blocks: permute → LayerNorm → Linear → GELU → Linear → permute.
        "convnext_tiny": lambda: layer_scaled(tv.convnext_tiny(num_classes=10)),
        "se_net": SENet,
        "resnet_option_a": resnet_option_a,
        "pad_net": PadNet,
        "unet": UNet,
        "unet_convtranspose": lambda: UNet(transposed=True),
        "fcn_resnet50": lambda: seg.fcn_resnet50(num_classes=5, weights_backbone=None, aux_loss=False),
        "deeplabv3_mobilenet_v3_large": lambda: seg.deeplabv3_mobilenet_v3_large(
            num_classes=5, weights_backbone=None, aux_loss=False),
        "ssdlite320_mobilenet_v3_large": lambda: Detector(det.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=5)),
        "retinanet_resnet50_fpn": lambda: Detector(det.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=5)),
        "yolo_style": YoloHead,
        "two_input": TwoInput,
    }


def input_shapes(m):
    """Per-sample shapes of the model's inputs (one 3x64x64 image unless it says)."""
    return getattr(m, "inputs", ((3, 64, 64),))


def export(m, path, exporter):
    """`legacy`: the TorchScript exporter with a symbolic batch; `dynamo`: PyTorch's default
    call, `torch.onnx.export(model, (x,), path)`, which fixes the batch to 1 and writes the
    weights to `path.data` beside the model."""
    xs = tuple(torch.randn(1, *s) for s in input_shapes(m))
    with torch.no_grad():
        if exporter == "legacy":
            ins = [f"input{k}" if k else "input" for k in range(len(xs))]
            n_out = len(m(*xs)) if isinstance(m(*xs), tuple) else 1
            outs = [f"out{k}" for k in range(n_out)] if n_out > 1 else ["logits"]
            dyn = {n: {0: "N"} for n in ins + outs}
            torch.onnx.export(m, xs, path, opset_version=17, input_names=ins, output_names=outs,
                              dynamo=False, dynamic_axes=dyn)
        else:
            torch.onnx.export(m, xs, path)


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


def lopper_forward(model, xs, d):
    """lopper's outputs, each flattened, one after another (what `lopper forward` writes)."""
    args = ["forward", model]
    for k, x in enumerate(xs):
        xi = os.path.join(d, f"x{k}.f32")
        x.astype("<f4").tofile(xi)
        args += ["--input", xi]
    yo = os.path.join(d, "y.f32")
    lopper(*args, "-o", yo)
    return np.fromfile(yo, dtype="<f4")


def ort_session(path):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def fixed_batch(s):
    b = s.get_inputs()[0].shape[0]
    return b if isinstance(b, int) else None


def ort_run(path, xs):
    """onnxruntime's outputs, flattened and laid end to end like lopper's."""
    s = ort_session(path)
    names = [i.name for i in s.get_inputs()]
    if fixed_batch(s) == 1:  # the default exporter's fixed batch: one sample at a time
        runs = [s.run(None, {n: x[i:i + 1] for n, x in zip(names, xs)}) for i in range(len(xs[0]))]
        outs = [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]
    else:
        outs = s.run(None, dict(zip(names, xs)))
    return np.concatenate([o.ravel() for o in outs])


def latency(path, xs, reps=30):
    s = ort_session(path)
    if fixed_batch(s) == 1:
        xs = [x[:1] for x in xs]
    feed = {i.name: x for i, x in zip(s.get_inputs(), xs)}
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


def check_one(m, name, exporter, d, rng):
    dense = os.path.join(d, f"{name}-{exporter}.onnx")
    base = dict(model=name, exporter=exporter)
    try:
        export(m, dense, exporter)
    except Exception as e:  # noqa: BLE001 — an exporter limitation, reported as such
        return dict(base, error="export: " + str(e).splitlines()[0][:160])
    shapes = input_shapes(m)
    # Eight samples: a batch that runs lopper's fused expansion + depthwise pairs
    # (4 images per thread or more on two threads).
    xs = [rng.standard_normal((8, *sh), dtype=np.float32) for sh in shapes]
    try:
        err_import = close(lopper_forward(dense, xs, d), ort_run(dense, xs))
        pruned_st = os.path.join(d, f"{name}-{exporter}-pruned.safetensors")
        pruned = os.path.join(d, f"{name}-{exporter}-pruned.onnx")
        # Widths in multiples of 8 keep onnxruntime's blocked (NCHWc) kernels; the small
        # nets (16-64 channels) use 4 so that 50 % MACs stays reachable.
        small = ("se_net", "pad_net", "unet", "unet_convtranspose", "two_input")
        round_to = "4" if name in small else "8"
        rep = json.loads(lopper("prune", dense, "--data", "none", "--method", "l1", "--keep-macs",
                                "0.5", "--round-to", round_to, "-o", pruned_st, "--json"))
        lopper("convert", pruned_st, "-o", pruned)
        err_pruned = close(ort_run(pruned, xs), lopper_forward(pruned_st, xs, d))
    except SystemExit as e:
        return dict(base, error=str(e).strip().splitlines()[-1][:300])
    xb = [rng.standard_normal((8, *sh), dtype=np.float32) for sh in shapes]
    one = fixed_batch(ort_session(dense)) == 1
    lat_d, lat_p = latency(dense, xb), latency(pruned, [x[:1] for x in xb] if one else xb)
    batch = 1 if one else 8
    # Sub-millisecond models are timer noise; their latency is reported, not checked.
    slower = lat_p >= lat_d and lat_d >= 1.0
    macs_ratio = rep["result"]["macs"] / rep["dense"]["macs"]
    failed = err_import > 1e-4 or err_pruned > 1e-4 or slower or not 0.4 <= macs_ratio <= 0.5
    return dict(base, import_err=err_import, pruned_err=err_pruned, macs_ratio=macs_ratio,
                params=(rep["dense"]["params"], rep["result"]["params"]), ort_ms=(lat_d, lat_p), batch=batch,
                blocked=rep.get("blocked", []), failed=failed)


def main():
    report = sys.argv[sys.argv.index("--report") + 1] if "--report" in sys.argv else None
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    rows, failures = [], []
    rng = np.random.default_rng(0)
    exporters = os.environ.get("EXPORTERS", "legacy dynamo").split()
    with tempfile.TemporaryDirectory() as d:
        only = os.environ.get("ONLY", "").split()
        for name, make in models().items():
            if only and name not in only:
                continue
            torch.manual_seed(0)
            m = make()
            randomise_bn(m)
            m.eval()
            for exporter in exporters:
                row = check_one(m, name, exporter, d, rng)
                rows.append(row)
                print(row, flush=True)
                if row.get("error") or row["failed"]:
                    failures.append(f"{name}/{exporter}")
    lines = ["| model | exporter | lopper vs onnxruntime (dense) | MACs after pruning | params | pruned export vs lopper | onnxruntime latency dense → pruned |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['exporter']} | fails: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['exporter']} | {r['import_err']:.1e} | {r['macs_ratio'] * 100:.1f} % | "
                     f"{r['params'][0] / 1e6:.2f} M → {r['params'][1] / 1e6:.2f} M | {r['pruned_err']:.1e} | "
                     f"b{r['batch']}: {r['ort_ms'][0]:.1f} → {r['ort_ms'][1]:.1f} ms |")
    print("\n".join(lines))
    if report:
        hdr = (f"# ONNX round trip against onnxruntime\n\n`python3 tests/onnx_fixtures/check.py` — torch {torch.__version__}, "
               f"torchvision {torchvision.__version__}, onnxruntime {ort.__version__}; inputs 3x64x64, random init with "
               "randomised BN; pruned with L1, local scope, widths rounded to 8 (4 for the SE net and the UNet); errors are max "
               "|difference| / max(1, max |reference|); latency: fastest of 30 runs, 2 threads, batch 8 for the legacy "
               "exports and batch 1 for the default exporter's (its dense model has a fixed batch of 1); groups "
               "blocked other than by the graph input and outputs are listed below the table.\n\n")
        inner = [f"- {r['model']} ({r['exporter']}): " + "; ".join(sorted({b for g in r['blocked'] for b in g['by']
                 if 'graph input' not in b and 'graph output' not in b}))
                 for r in rows if not r.get("error") and any(
                     'graph input' not in b and 'graph output' not in b for g in r['blocked'] for b in g['by'])]
        lines += [""] + (inner or ["No group was blocked except by the graph input and outputs."])
        open(report, "w").write(hdr + "\n".join(lines) + "\n")
    if failures:
        raise SystemExit(f"failed: {failures}")


if __name__ == "__main__":
    main()
