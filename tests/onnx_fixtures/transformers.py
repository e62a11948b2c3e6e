#!/usr/bin/env python3
"""Transformers from real exporters (issue 20): torchvision's ViT-B/16 (random weights,
the zero-initialised head and class token randomised) and a small torchvision ViT, each
exported by both PyTorch exporters. For each: lopper imports it (`lopper forward` on the
.onnx) = onnxruntime (<= 1e-4, relative to the output scale); `lopper prune --method l1
--keep-macs 0.5 --data none` removes heads and FFN units; the pruned model exported by
lopper runs in onnxruntime = lopper (<= 1e-4) and faster than the dense export; lopper's
own latency dense -> pruned is printed beside onnxruntime's.

Usage: python3 tests/onnx_fixtures/transformers.py [--report docs/results/transformers.md]
(the venv logic of check.py). ONLY="vit_tiny" narrows the run; EXPORTERS="dynamo" too."""
import json, os, sys, tempfile, time, warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check as C  # noqa: E402  (makes or enters the pinned venv first)

np, torch = C.np, C.torch
warnings.filterwarnings("ignore")
from torchvision.models import vit_b_16  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402


def randomised(m):
    torch.manual_seed(0)
    with torch.no_grad():
        m.heads.head.weight.normal_(0, 0.02)
        m.class_token.normal_(0, 0.02)
    return m.eval()


MODELS = {
    "vit_b_16": (lambda: randomised(vit_b_16(weights=None)), 224),
    "vit_tiny": (lambda: randomised(VisionTransformer(image_size=32, patch_size=4, num_layers=4,
                                                      num_heads=4, hidden_dim=128, mlp_dim=256,
                                                      num_classes=10)), 32),
}


def export(m, path, exporter, size):
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        if exporter == "legacy":
            torch.onnx.export(m, (x,), path, opset_version=17, input_names=["x"], output_names=["y"],
                              dynamo=False, dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        else:
            torch.onnx.export(m, (x,), path, input_names=["x"], output_names=["y"])


def main():
    rows, failed = [], False
    only = os.environ.get("ONLY", " ".join(MODELS)).split()
    exporters = os.environ.get("EXPORTERS", "dynamo legacy").split()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for name in only:
            make, size = MODELS[name]
            m = make()
            for exporter in exporters:
                dense = os.path.join(d, f"{name}-{exporter}.onnx")
                t = time.time()
                export(m, dense, exporter, size)
                x = rng.standard_normal((2, 3, size, size), dtype=np.float32)
                err_dense = C.close(C.ort_run(dense, [x]), C.lopper_forward(dense, [x], d))
                pst = os.path.join(d, f"{name}-{exporter}-pruned.safetensors")
                pon = os.path.join(d, f"{name}-{exporter}-pruned.onnx")
                rep = json.loads(C.lopper("prune", dense, "--data", "none", "--method", "l1",
                                          "--keep-macs", "0.5", "-o", pst, "--json"))
                C.lopper("convert", pst, "-o", pon)
                err_pruned = C.close(C.ort_run(pon, [x]), C.lopper_forward(pst, [x], d))
                ort_d, ort_p = C.latency(dense, [x[:1]], reps=5), C.latency(pon, [x[:1]], reps=5)
                macs = rep["result"]["macs"] / rep["dense"]["macs"]
                lop = (rep["dense"]["latency_b1_ms"], rep["result"]["latency_b1_ms"])
                bad = err_dense > 1e-4 or err_pruned > 1e-4 or ort_p >= ort_d or not 0.4 <= macs <= 0.55
                failed |= bad
                rows.append(f"| {name} | {exporter} | {err_dense:.1e} | {macs:.1%} | "
                            f"{rep['dense']['params'] / 1e6:.2f} M → {rep['result']['params'] / 1e6:.2f} M | "
                            f"{err_pruned:.1e} | {ort_d:.1f} → {ort_p:.1f} ms | {lop[0]:.1f} → {lop[1]:.1f} ms |"
                            f"{' FAILED' if bad else ''}")
                print(rows[-1], f"({time.time() - t:.0f} s)", flush=True)
    head = ("| model | exporter | lopper vs onnxruntime (dense) | MACs after pruning | params | "
            "pruned export vs lopper | onnxruntime b1 dense → pruned | lopper b1 dense → pruned |\n"
            "|---|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(rows)
    if "--report" in sys.argv:
        path = sys.argv[sys.argv.index("--report") + 1]
        with open(path, "w") as f:
            f.write("# Transformer import, pruning and export against onnxruntime\n\n"
                    f"`python3 tests/onnx_fixtures/transformers.py --report {path}` "
                    f"(torch {torch.__version__}, onnxruntime {C.ort.__version__}; "
                    f"CPU: {C.cpu_model() if hasattr(C, 'cpu_model') else os.popen('lscpu').read().split('Model name:')[1].splitlines()[0].strip()})\n\n"
                    + table + "\n")
    print(table)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
