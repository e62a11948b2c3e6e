//! What real exporters produce: external data beside the model (PyTorch's default
//! exporter), output names kept, every unsupported op reported at once, and the
//! activations other toolchains use (PReLU, HardSigmoid with any constants, ELU, SELU,
//! Softplus, Mish, tanh-GELU, general Clip) — each checked against its formula, through
//! export → import, and through pruning.

use candle_core::{Device, Tensor};
use lopper::data;
use lopper::exec::{forward, Mode};
use lopper::graph::builder::GraphBuilder;
use lopper::graph::ops::{
    Activation, ActivationKind, Conv2d, ConvTranspose2d, CoordMode, Nearest, Op, PRelu, Resize,
    ResizeMode, ResizeTarget,
};
use lopper::graph::Graph;
use lopper::onnx::{export::export_bytes, import::import_bytes};
use lopper::prune::dependency_groups;
use onnx_protobuf::{Message, ModelProto, StringStringEntryProto};

mod common;
use common::{fresh_dir, l1_half, max_diff, vals};

fn mnist8() -> Vec<u8> {
    std::fs::read(data::data_dir().join("models/mnist-8.onnx")).unwrap()
}

fn entry(k: &str, v: &str) -> StringStringEntryProto {
    let mut e = StringStringEntryProto::new();
    e.key = k.into();
    e.value = v.into();
    e
}

/// mnist-8 with every initialiser's bytes moved to `data_file` (as PyTorch writes it).
fn externalise(checksum: bool) -> (ModelProto, Vec<u8>) {
    let mut m = ModelProto::parse_from_bytes(&mnist8()).unwrap();
    let mut data = Vec::new();
    for t in &mut m.graph.as_mut().unwrap().initializer {
        let raw: Vec<u8> = if !t.int64_data.is_empty() {
            t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else if t.raw_data.is_empty() {
            t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else {
            std::mem::take(&mut t.raw_data)
        };
        t.float_data.clear();
        t.int64_data.clear();
        t.external_data = vec![
            entry("location", "m.onnx.data"),
            entry("offset", &data.len().to_string()),
            entry("length", &raw.len().to_string()),
        ];
        if checksum {
            let sum = sha1_hex(&raw);
            t.external_data.push(entry("checksum", &sum));
        }
        t.data_location = onnx_protobuf::tensor_proto::DataLocation::EXTERNAL.into();
        data.extend_from_slice(&raw);
        // Aligned like onnx's writer, so offsets are not all contiguous.
        data.resize(data.len().div_ceil(64) * 64, 0);
    }
    (m, data)
}

fn sha1_hex(b: &[u8]) -> String {
    sha1_smol::Sha1::from(b).digest().to_string()
}

/// Largest absolute difference of two equally long outputs.
fn outputs_of(g: &Graph, x: &Tensor) -> Vec<f32> {
    vals(&forward(g, x, Mode::Eval).unwrap())
}

#[test]
fn external_data_is_read_beside_the_model_and_checked() {
    let inline = import_bytes(&mnist8(), "inline").unwrap();
    let x = Tensor::rand(0f32, 255f32, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let want = outputs_of(&inline, &x);
    let dir = fresh_dir("onnx-external", "ok");
    let (m, data) = externalise(true);
    let model = dir.join("m.onnx");
    std::fs::write(&model, m.write_to_bytes().unwrap()).unwrap();
    std::fs::write(dir.join("m.onnx.data"), &data).unwrap();
    let g = lopper::onnx::load(&model).unwrap();
    assert_eq!(
        outputs_of(&g, &x),
        want,
        "external weights differ from inline ones"
    );
    // From memory there is no folder to read from: the error says so and names the tensor.
    let e = format!(
        "{:#}",
        import_bytes(&m.write_to_bytes().unwrap(), "mem").unwrap_err()
    );
    assert!(e.contains("m.onnx.data") && e.contains("file path"), "{e}");
    // A truncated data file names the tensor and the file.
    std::fs::write(dir.join("m.onnx.data"), &data[..data.len() / 2]).unwrap();
    let e = format!("{:#}", lopper::onnx::load(&model).unwrap_err());
    assert!(e.contains("beyond the end of 'm.onnx.data'"), "{e}");
    // A corrupted byte fails the recorded checksum.
    let mut bad = data.clone();
    bad[10] ^= 0x55;
    std::fs::write(dir.join("m.onnx.data"), &bad).unwrap();
    let e = format!("{:#}", lopper::onnx::load(&model).unwrap_err());
    assert!(e.contains("checksum"), "{e}");
    // A location outside the model's folder is refused.
    let mut m2 = m.clone();
    m2.graph.as_mut().unwrap().initializer[0].external_data[0] = entry("location", "../secret");
    std::fs::write(&model, m2.write_to_bytes().unwrap()).unwrap();
    let e = format!("{:#}", lopper::onnx::load(&model).unwrap_err());
    assert!(e.contains("relative to the model's folder"), "{e}");
}

/// Export with external data (`convert --external-data`, and automatically above 2 GB):
/// the weights go to `NAME.data` beside the model, which reads back to the same outputs;
/// small initialisers stay inline.
#[test]
fn export_writes_external_data_that_reads_back() {
    let g = import_bytes(&mnist8(), "inline").unwrap();
    let x = Tensor::rand(0f32, 255f32, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let dir = fresh_dir("onnx-external", "write");
    let model = dir.join("small.onnx");
    lopper::onnx::save_opts(&g, &model, &[], true).unwrap();
    let data = std::fs::read(dir.join("small.onnx.data")).unwrap();
    let weights: usize = g.params().values().map(|v| v.elem_count() * 4).sum();
    assert!(
        data.len() >= weights * 9 / 10,
        "{} of {weights} bytes",
        data.len()
    );
    let m = ModelProto::parse_from_bytes(&std::fs::read(&model).unwrap()).unwrap();
    let inits = &m.graph.as_ref().unwrap().initializer;
    assert!(inits.iter().any(|t| !t.external_data.is_empty()));
    assert!(inits
        .iter()
        .filter(|t| !t.external_data.is_empty())
        .all(|t| t.raw_data.is_empty()));
    let back = lopper::onnx::load(&model).unwrap();
    assert_eq!(outputs_of(&back, &x), outputs_of(&g, &x));
    // Through the CLI, and refused for a non-ONNX output.
    let out = dir.join("cli.onnx");
    let (ok, _, err) = common::lopper_cli(&[
        "convert",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--external-data",
    ]);
    assert!(ok, "{err}");
    assert!(dir.join("cli.onnx.data").exists());
    let back = lopper::onnx::load(&out).unwrap();
    assert_eq!(outputs_of(&back, &x), outputs_of(&g, &x));
    let st = dir.join("m.safetensors");
    let (ok, _, err) = common::lopper_cli(&[
        "convert",
        model.to_str().unwrap(),
        "-o",
        st.to_str().unwrap(),
        "--external-data",
    ]);
    assert!(!ok && err.contains("applies to ONNX output"), "{err}");
}

#[test]
fn output_names_survive_import_and_export() {
    let m = ModelProto::parse_from_bytes(&mnist8()).unwrap();
    let out = m.graph.as_ref().unwrap().output[0].name.clone();
    let g = import_bytes(&mnist8(), "mnist-8").unwrap();
    assert_eq!(g.nodes[g.outputs[0]].name, out);
    let back = ModelProto::parse_from_bytes(&export_bytes(&g).unwrap()).unwrap();
    assert_eq!(back.graph.as_ref().unwrap().output[0].name, out);
    let inp = m.graph.as_ref().unwrap().input[0].name.clone();
    assert_eq!(back.graph.as_ref().unwrap().input[0].name, inp);
}

#[test]
fn doc_strings_and_metadata_survive_pruning_saving_and_export() {
    let mut m = ModelProto::parse_from_bytes(&mnist8()).unwrap();
    m.doc_string = "digit classifier, trained by someone else".into();
    m.domain = "org.example".into();
    m.model_version = 7;
    m.metadata_props = vec![entry("license", "MIT"), entry("author", "A. N. Other")];
    let gp = m.graph.as_mut().unwrap();
    gp.name = "mnist".into();
    gp.doc_string = "the graph".into();
    gp.input[0].doc_string = "a 28x28 grey image".into();
    gp.output[0].doc_string = "ten logits".into();
    let (inp, out) = (gp.input[0].name.clone(), gp.output[0].name.clone());
    let g = import_bytes(&m.write_to_bytes().unwrap(), "mnist-8 with docs").unwrap();
    // Through pruning (surgery rebuilds the graph) and lopper's own saved format.
    let (_, pruned) = l1_half(&g, &dependency_groups(&g).unwrap());
    let dir = fresh_dir("onnx-docs", "meta");
    let path = dir.join("m.safetensors");
    lopper::graph::io::save(&pruned, &path).unwrap();
    let loaded = lopper::graph::io::load(&path).unwrap();
    assert_eq!(loaded.meta, g.meta);
    let back = ModelProto::parse_from_bytes(
        &lopper::onnx::export::export_bytes_with(
            &loaded,
            &[("author", "lopper user"), ("lopper.report", "{}")],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(back.doc_string, m.doc_string);
    assert_eq!(
        (back.domain.as_str(), back.model_version),
        ("org.example", 7)
    );
    let bg = back.graph.as_ref().unwrap();
    assert_eq!(
        (bg.name.as_str(), bg.doc_string.as_str()),
        ("mnist", "the graph")
    );
    assert_eq!(
        (bg.input[0].name.as_str(), bg.input[0].doc_string.as_str()),
        (inp.as_str(), "a 28x28 grey image")
    );
    assert_eq!(
        (bg.output[0].name.as_str(), bg.output[0].doc_string.as_str()),
        (out.as_str(), "ten logits")
    );
    let props: Vec<(&str, &str)> = back
        .metadata_props
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    // Source entries kept in order, the export's own entries replacing same-named ones,
    // the original producer recorded.
    assert_eq!(
        props[..3],
        [
            ("license", "MIT"),
            ("author", "lopper user"),
            ("lopper.report", "{}")
        ]
    );
    assert_eq!(props[3].0, "source_producer");
    assert!(props[3].1.starts_with(&m.producer_name), "{props:?}");
    assert_eq!(back.producer_name, "lopper");
}

#[test]
fn every_unsupported_op_is_listed_at_once() {
    let mut m = ModelProto::parse_from_bytes(&mnist8()).unwrap();
    let g = m.graph.as_mut().unwrap();
    let mut renamed = Vec::new();
    for (n, op) in g
        .node
        .iter_mut()
        .filter(|n| n.op_type == "Relu" || n.op_type == "MaxPool")
        .zip(["Einsum", "Einsum", "RoiAlign", "RoiAlign"])
    {
        n.op_type = op.into();
        renamed.push(n.name.clone());
    }
    let e = format!(
        "{:#}",
        import_bytes(&m.write_to_bytes().unwrap(), "two.onnx").unwrap_err()
    );
    assert!(e.contains("2 unsupported op type(s)"), "{e}");
    assert!(e.contains("Einsum") && e.contains("RoiAlign"), "{e}");
    for n in &renamed {
        assert!(e.contains(n.as_str()), "node {n} not named: {e}");
    }
}

fn reference(kind: ActivationKind, x: f32) -> f32 {
    let softplus = |x: f32| x.max(0.0) + (-x.abs()).exp().ln_1p();
    match kind {
        ActivationKind::HardSigmoidWith { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
        ActivationKind::Clip { lo, hi } => x.clamp(lo, hi),
        ActivationKind::Elu { alpha } => {
            if x > 0.0 {
                x
            } else {
                alpha * (x.exp() - 1.0)
            }
        }
        ActivationKind::Selu { alpha, gamma } => {
            gamma * if x > 0.0 { x } else { alpha * (x.exp() - 1.0) }
        }
        ActivationKind::Softplus => softplus(x),
        ActivationKind::Mish => x * softplus(x).tanh(),
        ActivationKind::GeluTanh => {
            let k = (2.0f32 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
        }
        other => panic!("no reference for {other:?}"),
    }
}

#[test]
fn new_activations_match_their_formulas_and_round_trip() {
    let kinds = [
        ActivationKind::HardSigmoidWith {
            alpha: 0.2,
            beta: 0.5,
        },
        ActivationKind::Clip { lo: -1.0, hi: 2.5 },
        ActivationKind::Elu { alpha: 0.7 },
        ActivationKind::Selu {
            alpha: 1.673_263_2,
            gamma: 1.050_701,
        },
        ActivationKind::Softplus,
        ActivationKind::Mish,
        ActivationKind::GeluTanh,
    ];
    let xs: Vec<f32> = (0..48).map(|i| -6.0 + 0.25 * i as f32 + 0.01).collect();
    let x = Tensor::from_vec(xs.clone(), (1, 3, 4, 4), &Device::Cpu).unwrap();
    for kind in kinds {
        let mut b = GraphBuilder::new(0);
        let i = b.input(&[3, 4, 4]).unwrap();
        let a = b
            .add("act", Op::Activation(Activation::new(kind)), &[i])
            .unwrap();
        let g = b.finish(&[a]).unwrap();
        let got = outputs_of(&g, &x);
        for (v, (&xi, &yi)) in xs.iter().zip(&got).enumerate() {
            let want = reference(kind, xi);
            assert!(
                (yi - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{kind:?} at x[{v}] = {xi}: {yi} vs {want}"
            );
        }
        let back = import_bytes(&export_bytes(&g).unwrap(), "export").unwrap();
        let again = outputs_of(&back, &x);
        let err = max_diff(&got, &again);
        assert!(err < 1e-6, "{kind:?} export → import differs by {err}");
    }
}

#[test]
fn prelu_slopes_are_pruned_with_their_channels() {
    let mut b = GraphBuilder::new(3);
    let i = b.input(&[3, 8, 8]).unwrap();
    let c1 = b.conv("c1", i, Conv2d::new(3, 16, 3, 1, 1)).unwrap();
    let p = b
        .add("act", Op::PRelu(PRelu { channels: 16 }), &[c1])
        .unwrap();
    let slopes: Vec<f32> = (0..16).map(|c| 0.05 * c as f32 - 0.3).collect();
    b.set(
        "act.weight",
        Tensor::from_vec(slopes.clone(), 16, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let c2 = b.conv("c2", p, Conv2d::new(16, 4, 3, 1, 1)).unwrap();
    let g = b.finish(&[c2]).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    // PReLU against its formula on the conv output.
    let cfg = lopper::exec::ForwardOpts {
        keep: &[c1, p],
        ..lopper::exec::ForwardOpts::new(Mode::Eval)
    };
    let out = lopper::exec::forward_with(&g, &x, &cfg).unwrap();
    let (pre, post) = (vals(&out.kept[&c1]), vals(&out.kept[&p]));
    for (k, (&a, &y)) in pre.iter().zip(&post).enumerate() {
        let s = slopes[(k / 64) % 16];
        let want = if a > 0.0 { a } else { s * a };
        assert!((y - want).abs() < 1e-5, "PReLU at {k}: {y} vs {want}");
    }
    // Pruning keeps each kept channel's slope with it.
    let groups = dependency_groups(&g).unwrap();
    let (removal, pruned) = l1_half(&g, &groups);
    let pid = pruned.node_id("act").unwrap();
    let Op::PRelu(pr) = &pruned.nodes[pid].op else {
        panic!("PReLU vanished")
    };
    assert_eq!(pr.channels, 8);
    let kept: Vec<f32> = vals(pruned.param(pid, "weight").unwrap().as_tensor());
    let want: Vec<f32> = (0..16)
        .filter(|c| !removal.removed[pid].contains(c))
        .map(|c| slopes[c])
        .collect();
    assert_eq!(kept, want);
    // And the pruned graph exports and imports to the same outputs.
    let back = import_bytes(&export_bytes(&pruned).unwrap(), "pruned").unwrap();
    let (a, b) = (outputs_of(&pruned, &x), outputs_of(&back, &x));
    let err = max_diff(&a, &b);
    assert!(err < 1e-5, "pruned PReLU export differs by {err}");
}

/// ONNX's resize rule for one output pixel, written out directly (no matrices).
fn resize_ref(r: &Resize, x: &[f32], h: usize, w: usize, oy: usize, ox: usize) -> f32 {
    let (oh, ow) = r.out_size(h, w);
    let (sh, sw) = match r.target {
        ResizeTarget::Scales { h, w } => (h, w),
        ResizeTarget::Sizes { .. } => (oh as f64 / h as f64, ow as f64 / w as f64),
    };
    let src = |o: usize, s: f64, out: usize, inp: usize| -> f64 {
        match r.coord {
            CoordMode::HalfPixel => (o as f64 + 0.5) / s - 0.5,
            CoordMode::PytorchHalfPixel if out > 1 => (o as f64 + 0.5) / s - 0.5,
            CoordMode::PytorchHalfPixel => 0.0,
            CoordMode::AlignCorners if out > 1 => o as f64 * (inp - 1) as f64 / (out - 1) as f64,
            CoordMode::AlignCorners => 0.0,
            CoordMode::Asymmetric => o as f64 / s,
        }
    };
    let (fy, fx) = (src(oy, sh, oh, h), src(ox, sw, ow, w));
    let at = |y: usize, x_: usize| x[y * w + x_];
    match r.mode {
        ResizeMode::Nearest(n) => {
            let round = |v: f64| match n {
                Nearest::Floor => v.floor(),
                Nearest::Ceil => v.ceil(),
                Nearest::RoundPreferFloor => (v - 0.5).ceil(),
                Nearest::RoundPreferCeil => (v + 0.5).floor(),
            };
            let iy = round(fy).clamp(0.0, (h - 1) as f64) as usize;
            let ix = round(fx).clamp(0.0, (w - 1) as f64) as usize;
            at(iy, ix)
        }
        ResizeMode::Linear => {
            let fy = fy.clamp(0.0, (h - 1) as f64);
            let fx = fx.clamp(0.0, (w - 1) as f64);
            let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
            let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
            let (ty, tx) = ((fy - y0 as f64) as f32, (fx - x0 as f64) as f32);
            let top = at(y0, x0) * (1.0 - tx) + at(y0, x1) * tx;
            let bot = at(y1, x0) * (1.0 - tx) + at(y1, x1) * tx;
            top * (1.0 - ty) + bot * ty
        }
    }
}

#[test]
fn resize_matches_onnx_rules_round_trips_and_follows_resolution() {
    let cases = [
        (
            ResizeMode::Linear,
            CoordMode::HalfPixel,
            ResizeTarget::Scales { h: 2.0, w: 2.0 },
        ),
        (
            ResizeMode::Linear,
            CoordMode::PytorchHalfPixel,
            ResizeTarget::Sizes { h: 9, w: 4 },
        ),
        (
            ResizeMode::Linear,
            CoordMode::AlignCorners,
            ResizeTarget::Sizes { h: 11, w: 13 },
        ),
        (
            ResizeMode::Nearest(Nearest::Floor),
            CoordMode::Asymmetric,
            ResizeTarget::Scales { h: 2.0, w: 3.0 },
        ),
        (
            ResizeMode::Nearest(Nearest::RoundPreferFloor),
            CoordMode::HalfPixel,
            ResizeTarget::Sizes { h: 3, w: 7 },
        ),
        (
            ResizeMode::Nearest(Nearest::RoundPreferCeil),
            CoordMode::AlignCorners,
            ResizeTarget::Sizes { h: 8, w: 2 },
        ),
    ];
    let (c, h, w) = (2, 5, 6);
    let x = Tensor::randn(0f32, 1.0, (1, c, h, w), &Device::Cpu).unwrap();
    let xv = vals(&x);
    for (mode, coord, target) in cases {
        let r = Resize {
            mode,
            coord,
            target,
        };
        let mut b = GraphBuilder::new(0);
        let i = b.input(&[c, h, w]).unwrap();
        let o = b.add("up", Op::Resize(r.clone()), &[i]).unwrap();
        let g = b.finish(&[o]).unwrap();
        let got = outputs_of(&g, &x);
        let (oh, ow) = r.out_size(h, w);
        assert_eq!(got.len(), c * oh * ow, "{r:?}");
        for ch in 0..c {
            let plane = &xv[ch * h * w..(ch + 1) * h * w];
            for oy in 0..oh {
                for ox in 0..ow {
                    let want = resize_ref(&r, plane, h, w, oy, ox);
                    let y = got[(ch * oh + oy) * ow + ox];
                    assert!(
                        (y - want).abs() < 1e-5,
                        "{r:?} at {ch},{oy},{ox}: {y} vs {want}"
                    );
                }
            }
        }
        let back = import_bytes(&export_bytes(&g).unwrap(), "resize").unwrap();
        assert_eq!(outputs_of(&back, &x), got, "{r:?}: export → import differs");
    }
    // A scale follows a resolution change; the gradient flows through the resize.
    let r = Resize {
        mode: ResizeMode::Linear,
        coord: CoordMode::HalfPixel,
        target: ResizeTarget::Scales { h: 2.0, w: 2.0 },
    };
    let mut b = GraphBuilder::new(1);
    let i = b.input(&[3, 8, 8]).unwrap();
    let cv = b.conv("c", i, Conv2d::new(3, 4, 3, 1, 1)).unwrap();
    let o = b.add("up", Op::Resize(r), &[cv]).unwrap();
    let g = b.finish(&[o]).unwrap();
    let small = lopper::prune::with_resolution(&g, 6, 6).unwrap();
    assert_eq!(small.shapes().unwrap()[small.outputs[0]], vec![4, 12, 12]);
    let xs = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let y = forward(&g, &xs, Mode::Train).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let cw = g.param(g.node_id("c").unwrap(), "weight").unwrap();
    assert!(
        grads.get(cw.as_tensor()).is_some(),
        "no gradient through Resize"
    );
}

/// Squeeze-excitation whose gate goes through reshapes (`[C,1,1] → [C] → … → [C,1,1]`, as
/// exporters write Squeeze/Unsqueeze) and a flatten written as a reshape: the channel
/// groups follow the reshapes, so pruning is not blocked, and the result runs.
#[test]
fn reshapes_around_squeeze_excitation_do_not_block_pruning() {
    let mut b = GraphBuilder::new(5);
    let i = b.input(&[3, 6, 6]).unwrap();
    let c1 = b.conv("c1", i, Conv2d::new(3, 16, 3, 1, 1)).unwrap();
    let r1 = b.relu(c1).unwrap();
    let gap = b.gap(r1).unwrap();
    let sq = b
        .add(
            "squeeze",
            Op::Reshape(lopper::graph::ops::Reshape { shape: vec![16] }),
            &[gap],
        )
        .unwrap();
    let f1 = b.linear("fc1", sq, 16, 4).unwrap();
    let a1 = b.relu(f1).unwrap();
    let f2 = b.linear("fc2", a1, 4, 16).unwrap();
    let un = b
        .add(
            "unsqueeze",
            Op::Reshape(lopper::graph::ops::Reshape {
                shape: vec![16, 1, 1],
            }),
            &[f2],
        )
        .unwrap();
    let gate = b.act(un, ActivationKind::Sigmoid).unwrap();
    let m = b.mul_nodes(r1, gate).unwrap();
    let c2 = b.conv("c2", m, Conv2d::new(16, 8, 3, 2, 1)).unwrap();
    let flat = b
        .add(
            "flat",
            Op::Reshape(lopper::graph::ops::Reshape { shape: vec![-1] }),
            &[c2],
        )
        .unwrap();
    let head = b.linear("head", flat, 8 * 9, 5).unwrap();
    let g = b.finish(&[head]).unwrap();
    let groups = dependency_groups(&g).unwrap();
    let c1_id = g.node_id("c1").unwrap();
    let owner = groups.owner[c1_id][0].0;
    assert!(
        groups.groups[owner].prunable_units().len() == 16,
        "the SE-gated group is blocked: {:?}",
        lopper::prune::blocked_groups(&g, &groups)
    );
    let (_, pruned) = l1_half(&g, &groups);
    let width = |g: &Graph, n: &str| match &g.nodes[g.node_id(n).unwrap()].op {
        Op::Conv2d(c) => c.out_channels,
        Op::Linear(l) => l.in_features,
        _ => unreachable!(),
    };
    assert_eq!(width(&pruned, "c1"), 8, "the SE-gated conv was not pruned");
    assert_eq!(width(&pruned, "c2"), 4, "the flattened conv was not pruned");
    assert_eq!(
        width(&pruned, "head"),
        4 * 9,
        "the head did not follow the flatten"
    );
    let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &Device::Cpu).unwrap();
    let back = import_bytes(&export_bytes(&pruned).unwrap(), "se").unwrap();
    let (a, bb) = (outputs_of(&pruned, &x), outputs_of(&back, &x));
    assert_eq!(a.len(), 2 * 5);
    let err = max_diff(&a, &bb);
    assert!(err < 1e-5, "pruned SE export differs by {err}");
}

/// A transposed conv by its definition: every input pixel scatters its kernel.
fn conv_transpose_ref(
    c: &ConvTranspose2d,
    x: &[f32],
    w: &[f32],
    h: usize,
    wd: usize,
) -> (Vec<f32>, usize, usize) {
    let (oh, ow) = (c.out_len(0, h).unwrap(), c.out_len(1, wd).unwrap());
    let (cin, g) = (c.in_channels, c.groups);
    let (ig, og) = (cin / g, c.out_channels / g);
    let (kh, kw) = (c.kernel[0], c.kernel[1]);
    let mut y = vec![0f32; c.out_channels * oh * ow];
    for ci in 0..cin {
        let gi = ci / ig;
        for iy in 0..h {
            for ix in 0..wd {
                let v = x[(ci * h + iy) * wd + ix];
                for oo in 0..og {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let py = (iy * c.stride[0] + ky * c.dilation[0]) as i64
                                - c.padding[0] as i64;
                            let px = (ix * c.stride[1] + kx * c.dilation[1]) as i64
                                - c.padding[1] as i64;
                            if py < 0 || px < 0 || py >= oh as i64 || px >= ow as i64 {
                                continue;
                            }
                            let o = gi * og + oo;
                            let wv = w[((ci * og + oo) * kh + ky) * kw + kx];
                            y[(o * oh + py as usize) * ow + px as usize] += v * wv;
                        }
                    }
                }
            }
        }
    }
    (y, oh, ow)
}

#[test]
fn conv_transpose_matches_its_definition_trains_and_prunes_on_both_axes() {
    let ct = |cin,
              cout,
              k: [usize; 2],
              s: [usize; 2],
              p: [usize; 4],
              op: [usize; 2],
              d: [usize; 2],
              g| {
        ConvTranspose2d {
            in_channels: cin,
            out_channels: cout,
            kernel: k,
            stride: s,
            padding: p,
            output_padding: op,
            dilation: d,
            groups: g,
            bias: false,
        }
    };
    let cases = [
        ct(4, 6, [2, 2], [2, 2], [0; 4], [0, 0], [1, 1], 1),
        ct(4, 6, [3, 3], [2, 2], [1; 4], [1, 1], [1, 1], 1),
        ct(3, 2, [3, 2], [1, 3], [2, 0, 1, 1], [0, 2], [1, 1], 1),
        ct(4, 4, [3, 3], [2, 1], [1, 0, 0, 2], [1, 0], [2, 2], 2),
    ];
    let (h, w) = (5, 4);
    for c in cases {
        let mut b = GraphBuilder::new(2);
        let i = b.input(&[c.in_channels, h, w]).unwrap();
        let t = b.add("up", Op::ConvTranspose2d(c.clone()), &[i]).unwrap();
        let g = b.finish(&[t]).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, c.in_channels, h, w), &Device::Cpu).unwrap();
        let wv = vals(g.param(t, "weight").unwrap().as_tensor());
        let (want, oh, ow) = conv_transpose_ref(&c, &vals(&x), &wv, h, w);
        let got = outputs_of(&g, &x);
        assert_eq!(got.len(), want.len(), "{c:?}: {oh}x{ow}");
        assert!(
            max_diff(&got, &want) < 1e-4,
            "{c:?}: differs by {}",
            max_diff(&got, &want)
        );
        let back = import_bytes(&export_bytes(&g).unwrap(), "convt").unwrap();
        assert!(
            max_diff(&outputs_of(&back, &x), &got) < 1e-6,
            "{c:?}: export → import"
        );
    }
    // conv → transposed conv → conv: pruning slices the transposed weight on both axes,
    // and the gradient reaches it.
    let mut b = GraphBuilder::new(3);
    let i = b.input(&[3, 6, 6]).unwrap();
    let c1 = b.conv("c1", i, Conv2d::new(3, 16, 3, 2, 1)).unwrap();
    let r = b.relu(c1).unwrap();
    let mut up = ct(16, 12, [2, 2], [2, 2], [0; 4], [0, 0], [1, 1], 1);
    up.bias = true;
    let t = b.add("up", Op::ConvTranspose2d(up), &[r]).unwrap();
    let r2 = b.relu(t).unwrap();
    let c2 = b.conv("c2", r2, Conv2d::new(12, 2, 1, 1, 0)).unwrap();
    let g = b.finish(&[c2]).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &Device::Cpu).unwrap();
    let y = forward(&g, &x, Mode::Train).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let tw = g.param(t, "weight").unwrap();
    assert!(
        grads.get(tw.as_tensor()).is_some(),
        "no gradient into the transposed conv"
    );
    let groups = dependency_groups(&g).unwrap();
    let (_, pruned) = l1_half(&g, &groups);
    let pt = pruned.node_id("up").unwrap();
    let Op::ConvTranspose2d(p) = &pruned.nodes[pt].op else {
        panic!("transposed conv vanished")
    };
    assert_eq!((p.in_channels, p.out_channels), (8, 6));
    assert_eq!(pruned.param(pt, "weight").unwrap().dims(), &[8, 6, 2, 2]);
    let back = import_bytes(&export_bytes(&pruned).unwrap(), "pruned").unwrap();
    assert!(max_diff(&outputs_of(&pruned, &x), &outputs_of(&back, &x)) < 1e-5);
}

/// A batch fixed at 1 in the file (mnist-8, PyTorch's default exporter) is run at any
/// batch, and the import says so; lopper's own exports have a symbolic batch: no note.
#[test]
fn a_fixed_batch_is_made_symbolic_and_said() {
    let (g, notes) = lopper::onnx::import::import_noting(&mnist8(), "mnist-8", None).unwrap();
    assert!(
        notes.iter().any(|n| n.contains("batch fixed at 1")),
        "{notes:?}"
    );
    let x = Tensor::rand(0f32, 255f32, (5, 1, 28, 28), &Device::Cpu).unwrap();
    assert_eq!(outputs_of(&g, &x).len(), 5 * 10);
    let (_, again) =
        lopper::onnx::import::import_noting(&export_bytes(&g).unwrap(), "export", None).unwrap();
    assert!(again.is_empty(), "{again:?}");
}

/// Reflect, edge and constant-value padding of H and W against their definitions, and
/// through export → import.
#[test]
fn spatial_padding_modes_match_their_definitions() {
    use lopper::graph::ops::{PadMode, SpatialPad};
    let (c, h, w) = (2, 4, 5);
    let x = Tensor::randn(0f32, 1.0, (1, c, h, w), &Device::Cpu).unwrap();
    let xv = vals(&x);
    for mode in [
        PadMode::Reflect,
        PadMode::Edge,
        PadMode::Constant { value: 0.5 },
    ] {
        let p = SpatialPad {
            pads: [2, 1, 3, 3],
            mode,
        };
        let mut b = GraphBuilder::new(0);
        let i = b.input(&[c, h, w]).unwrap();
        let o = b.add("pad", Op::SpatialPad(p.clone()), &[i]).unwrap();
        let g = b.finish(&[o]).unwrap();
        let got = outputs_of(&g, &x);
        let (oh, ow) = (h + 5, w + 4);
        assert_eq!(got.len(), c * oh * ow);
        let src = |v: i64, len: i64| -> Option<usize> {
            match mode {
                PadMode::Reflect => Some(if v < 0 {
                    -v
                } else if v >= len {
                    2 * (len - 1) - v
                } else {
                    v
                } as usize),
                PadMode::Edge => Some(v.clamp(0, len - 1) as usize),
                PadMode::Constant { .. } => (0..len).contains(&v).then_some(v as usize),
            }
        };
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (sy, sx) = (src(oy as i64 - 2, h as i64), src(ox as i64 - 1, w as i64));
                    let want = match (sy, sx) {
                        (Some(y), Some(x_)) => xv[(ch * h + y) * w + x_],
                        _ => 0.5,
                    };
                    assert_eq!(
                        got[(ch * oh + oy) * ow + ox],
                        want,
                        "{mode:?} at {ch},{oy},{ox}"
                    );
                }
            }
        }
        let back = import_bytes(&export_bytes(&g).unwrap(), "pad").unwrap();
        assert_eq!(outputs_of(&back, &x), got, "{mode:?}: export → import");
    }
}

/// The IR's n-ary add exports as ONNX `Sum` (Add is binary there) and imports back.
#[test]
fn three_way_adds_round_trip_as_sum() {
    let mut b = GraphBuilder::new(4);
    let i = b.input(&[3, 5, 5]).unwrap();
    let c1 = b.conv("c1", i, Conv2d::new(3, 4, 3, 1, 1)).unwrap();
    let c2 = b.conv("c2", i, Conv2d::new(3, 4, 1, 1, 0)).unwrap();
    let c3 = b.conv("c3", i, Conv2d::new(3, 4, 3, 1, 1)).unwrap();
    let s = b
        .add("sum", Op::Add(lopper::graph::ops::Add {}), &[c1, c2, c3])
        .unwrap();
    let g = b.finish(&[s]).unwrap();
    let bytes = export_bytes(&g).unwrap();
    let m = ModelProto::parse_from_bytes(&bytes).unwrap();
    assert!(m
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .any(|n| n.op_type == "Sum"));
    let back = import_bytes(&bytes, "sum").unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 5), &Device::Cpu).unwrap();
    assert!(max_diff(&outputs_of(&g, &x), &outputs_of(&back, &x)) < 1e-6);
}
