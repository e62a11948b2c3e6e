#!/usr/bin/env python3
"""lopper's own ViT (issue 20: channels-first tokens, MultiHeadAttention, LayerNorm,
PosEmbed) exported to ONNX and run by onnxruntime: dense and pruned by heads and FFN units
to ~50 % MACs (`lopper prune --data none --method l1`), onnxruntime = lopper <= 1e-4 on
both, and the pruned export faster than the dense one in onnxruntime.

Usage: python3 tests/onnx_fixtures/vit.py   (the venv logic of check.py: pinned packages
in target/fixtures-venv when missing)."""
import json, os, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check as C  # noqa: E402  (makes or enters the pinned venv first)

np = C.np


def forward(model, seed, x, d):
    xi, yo = os.path.join(d, "x.f32"), os.path.join(d, "y.f32")
    x.astype("<f4").tofile(xi)
    C.lopper("forward", model, "--init-seed", seed, "--input", xi, "-o", yo)
    return np.fromfile(yo, dtype="<f4")


def main():
    rng = np.random.default_rng(0)
    failed = False
    with tempfile.TemporaryDirectory() as d:
        for spec in ("vit@3x32x32", "vit:192-4-3-4-4@3x32x32", "vit:128-4-4-4-2-cls@3x32x32"):
            seed = "1"
            dense = os.path.join(d, "dense.onnx")
            C.lopper("convert", spec, "--init-seed", seed, "-o", dense)
            x = rng.standard_normal((4, 3, 32, 32), dtype=np.float32)
            err_dense = C.close(C.ort_run(dense, [x]), forward(spec, seed, x, d))
            pst, pon = os.path.join(d, "pruned.safetensors"), os.path.join(d, "pruned.onnx")
            rep = json.loads(C.lopper("prune", spec, "--init-seed", seed, "--data", "none",
                                      "--method", "l1", "--keep-macs", "0.5", "-o", pst, "--json"))
            C.lopper("convert", pst, "-o", pon)
            xi = os.path.join(d, "x.f32")
            x.astype("<f4").tofile(xi)
            yo = os.path.join(d, "y.f32")
            C.lopper("forward", pst, "--input", xi, "-o", yo)
            err_pruned = C.close(C.ort_run(pon, [x]), np.fromfile(yo, dtype="<f4"))
            xb = rng.standard_normal((8, 3, 32, 32), dtype=np.float32)
            lat_d, lat_p = C.latency(dense, [xb]), C.latency(pon, [xb])
            macs = rep["result"]["macs"] / rep["dense"]["macs"]
            bad = err_dense > 1e-4 or err_pruned > 1e-4 or lat_p >= lat_d or not 0.4 <= macs <= 0.55
            failed |= bad
            print(f"{spec}: ort vs lopper dense {err_dense:.2e}, pruned {err_pruned:.2e}; MACs kept "
                  f"{macs:.1%}; ort b8 {lat_d:.2f} -> {lat_p:.2f} ms{'  FAILED' if bad else ''}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
