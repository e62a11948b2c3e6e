#!/usr/bin/env python3
"""Transformers from real exporters (issue 20): torchvision's ViT-B/16 (random weights,
the zero-initialised head and class token randomised) and a small torchvision ViT, each
exported by both PyTorch exporters, and a BERT-style encoder from the transformers library
(int64 input_ids and attention_mask; the default exporter: transformers 5 no longer traces
with TorchScript). For each: lopper imports it (`lopper forward` on the
.onnx) = onnxruntime (<= 1e-4, relative to the output scale); `lopper prune --method l1
--keep-macs 0.5 --data none` removes heads and FFN units; the pruned model exported by
lopper runs in onnxruntime = lopper (<= 1e-4) and faster than the dense export; lopper's
own latency dense -> pruned is printed beside onnxruntime's.

Usage: python3 tests/onnx_fixtures/transformer_models.py [--report docs/results/transformers.md]
(the venv logic of check.py, plus transformers 5.25.0). ONLY="vit_tiny bert" narrows the run;
EXPORTERS="dynamo" too."""
import json, os, sys, tempfile, time, warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check as C  # noqa: E402  (makes or enters the pinned venv first)
import importlib.util  # noqa: E402
import subprocess  # noqa: E402

TRANSFORMERS = "transformers==5.25.0"
if importlib.util.find_spec("transformers") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", TRANSFORMERS], check=True)

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
    # Not under no_grad: there nn.MultiheadAttention takes its fused fast path, which the
    # TorchScript exporter cannot write.
    x = torch.randn(1, 3, size, size)
    if exporter == "legacy":
        torch.onnx.export(m, (x,), path, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamo=False, dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    else:
        torch.onnx.export(m, (x,), path, input_names=["x"], output_names=["y"])


def bert():
    """A BERT-style encoder from the transformers library (random init, MiniLM-sized:
    6 layers of width 384 with 6 heads, FFN 1536, BERT's 30522-token vocabulary), exported by
    the default exporter with input_ids and attention_mask at 128 tokens."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                     intermediate_size=1536, max_position_embeddings=512)
    return BertModel(cfg).eval()


def lopper_tokens(model, ids, mask, d):
    a, b, y = (os.path.join(d, f) for f in ("ids.i64", "mask.i64", "y.f32"))
    ids.astype("<i8").tofile(a)
    mask.astype("<i8").tofile(b)
    C.lopper("forward", model, "--input", a, "--input", b, "-o", y)
    return np.fromfile(y, dtype="<f4")


def check_bert(d, rows):
    m = bert()
    path = os.path.join(d, "bert.onnx")
    t = time.time()
    ids = np.random.default_rng(0).integers(0, 30522, (2, 128)).astype(np.int64)
    mask = np.ones((2, 128), np.int64)
    mask[1, 100:] = 0
    torch.onnx.export(m, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])), path,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state", "pooler_output"])
    err_dense = C.close(C.ort_run(path, [ids, mask]), lopper_tokens(path, ids, mask, d))
    pst, pon = os.path.join(d, "bert-pruned.safetensors"), os.path.join(d, "bert-pruned.onnx")
    rep = json.loads(C.lopper("prune", path, "--data", "none", "--method", "l1", "--keep-macs", "0.5",
                              "-o", pst, "--json"))
    C.lopper("convert", pst, "-o", pon)
    err_pruned = C.close(C.ort_run(pon, [ids, mask]), lopper_tokens(pst, ids, mask, d))
    ort_d, ort_p = C.latency(path, [ids, mask], reps=5), C.latency(pon, [ids, mask], reps=5)
    return row("bert (MiniLM-sized, 128 tokens, padding mask)", "dynamo", err_dense, err_pruned, rep,
               ort_d, ort_p, t, rows)


def row(name, exporter, err_dense, err_pruned, rep, ort_d, ort_p, t, rows):
    macs = rep["result"]["macs"] / rep["dense"]["macs"]
    lop = (rep["dense"]["latency_b1_ms"], rep["result"]["latency_b1_ms"])
    bad = err_dense > 1e-4 or err_pruned > 1e-4 or ort_p >= ort_d or not 0.4 <= macs <= 0.6
    rows.append(f"| {name} | {exporter} | {err_dense:.1e} | {macs:.1%} | "
                f"{rep['dense']['params'] / 1e6:.2f} M → {rep['result']['params'] / 1e6:.2f} M | "
                f"{err_pruned:.1e} | {ort_d:.1f} → {ort_p:.1f} ms | {lop[0]:.1f} → {lop[1]:.1f} ms |"
                f"{' FAILED' if bad else ''}")
    print(rows[-1], f"({time.time() - t:.0f} s)", flush=True)
    return bad


def main():
    rows, failed = [], False
    only = os.environ.get("ONLY", " ".join(MODELS) + " bert").split()
    exporters = os.environ.get("EXPORTERS", "dynamo legacy").split()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for name in [n for n in only if n in MODELS]:
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
                failed |= row(name, exporter, err_dense, err_pruned, rep, ort_d, ort_p, t, rows)
        if "bert" in only:
            failed |= check_bert(d, rows)
    head = ("| model | exporter | lopper vs onnxruntime (dense) | MACs after pruning | params | "
            "pruned export vs lopper | onnxruntime b1 dense → pruned | lopper b1 dense → pruned |\n"
            "|---|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(rows)
    if "--report" in sys.argv:
        path = sys.argv[sys.argv.index("--report") + 1]
        with open(path, "w") as f:
            f.write("# Transformer import, pruning and export against onnxruntime\n\n"
                    f"`python3 tests/onnx_fixtures/transformer_models.py --report {path}` "
                    f"(torch {torch.__version__}, onnxruntime {C.ort.__version__}; "
                    f"CPU: {C.cpu_model() if hasattr(C, 'cpu_model') else os.popen('lscpu').read().split('Model name:')[1].splitlines()[0].strip()})\n\n"
                    + table + "\n")
    print(table)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
