//! Sparsity machinery: masks (unstructured, per-row, global, N:M), straight-through masked
//! weights, BN folding, batch-norm re-estimation, the POT pieces (spec §8.10) and the CSR
//! format and kernels.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{randomise_bn, vals};
use lopper::data::{self, Split};
use lopper::exec::{forward, forward_with, ForwardOpts, Mode, WeightMask};
use lopper::exec::{Feeds, Plan, PlanOpts};
use lopper::graph::fold::fold_batchnorm;
use lopper::kernels::csr::CsrKernels;
use lopper::methods::pts::pot::{bias_correction, correct_channel};
use lopper::methods::pts::uniform_magnitude;
use lopper::sparse::bn::reset_bn;
use lopper::sparse::layers::{apply_masks, prunable_layers, sparsity_report, weight_host};
use lopper::sparse::mask::{global_masks, magnitude_mask, nm_mask, row_masks, Pattern};
use lopper::sparse::CsrMatrix;
use lopper::zoo;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::collections::HashMap;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Pcg64::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-1.0..1.0)).collect()
}

#[test]
fn magnitude_mask_zeroes_exactly_the_smallest() {
    let w = random(1000, 1);
    let a: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    for j in [0, 1, 333, 999, 1000] {
        let m = magnitude_mask(&a, j);
        assert_eq!(m.iter().filter(|v| **v == 0.0).count(), j);
        let kept_min = a
            .iter()
            .zip(&m)
            .filter(|(_, m)| **m == 1.0)
            .map(|(a, _)| *a)
            .fold(f32::INFINITY, f32::min);
        let pruned_max = a
            .iter()
            .zip(&m)
            .filter(|(_, m)| **m == 0.0)
            .map(|(a, _)| *a)
            .fold(0.0, f32::max);
        assert!(j == 0 || j == 1000 || kept_min >= pruned_max);
    }
    // Ties: (|w| asc, index asc) — the lowest indices go first.
    let m = magnitude_mask(&[0.5; 6], 2);
    assert_eq!(m, vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    let m = magnitude_mask(&[0.5, 0.1, 0.5, 0.1], 3);
    assert_eq!(m, vec![0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn row_global_and_nm_masks() {
    let a: Vec<f32> = random(40, 2).iter().map(|v| v.abs()).collect();
    let m = row_masks(&a, 10, 7);
    for r in m.chunks(10) {
        assert_eq!(r.iter().filter(|v| **v == 0.0).count(), 7);
    }
    let layers = vec![a[..10].to_vec(), a[10..].to_vec()];
    let g = global_masks(&layers, 0.5);
    assert_eq!(g.iter().flatten().filter(|v| **v == 0.0).count(), 20);
    let thr = layers
        .iter()
        .flatten()
        .zip(g.iter().flatten())
        .filter(|(_, m)| **m == 1.0)
        .map(|(a, _)| *a)
        .fold(f32::INFINITY, f32::min);
    assert!(layers
        .iter()
        .flatten()
        .zip(g.iter().flatten())
        .all(|(a, m)| *m == 1.0 || *a <= thr));
    // 2:4 along rows of 8: every group of 4 keeps its 2 largest.
    let m = nm_mask(&a[..16], 8, 2, 4);
    for (grp, mg) in a[..16].chunks(4).zip(m.chunks(4)) {
        assert_eq!(mg.iter().filter(|v| **v == 1.0).count(), 2);
        let kept_min = grp
            .iter()
            .zip(mg)
            .filter(|(_, m)| **m == 1.0)
            .map(|(a, _)| *a)
            .fold(f32::INFINITY, f32::min);
        assert!(grp.iter().zip(mg).all(|(a, m)| *m == 1.0 || *a <= kept_min));
    }
    // A row tail shorter than M keeps ceil(N·len/M).
    let m = nm_mask(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 6, 2, 4);
    assert_eq!(m, vec![0.0, 0.0, 1.0, 1.0, 0.0, 1.0]);
}

#[test]
fn pattern_and_sparsity_inputs_are_checked() {
    assert_eq!(Pattern::parse("2:4").unwrap(), Pattern::NM { n: 2, m: 4 });
    assert_eq!(
        Pattern::parse("unstructured").unwrap(),
        Pattern::Unstructured
    );
    for bad in ["4:4", "5:4", "0:4", "a:b", "24"] {
        let e = Pattern::parse(bad).unwrap_err().to_string();
        assert!(e.contains(bad.split(':').next().unwrap()), "{e}");
    }
    for s in [1.0, -0.1, 1.5, f64::NAN] {
        assert!(lopper::sparse::mask::check_sparsity(s).is_err());
    }
}

#[test]
fn straight_through_mask_forwards_masked_and_passes_the_full_gradient() {
    // One linear layer: y = x Wᵀ. Masked forward must equal the forward of m⊙W; with STE
    // the gradient w.r.t. W is the gradient w.r.t. W̃ on every entry, pruned ones included.
    let g = zoo::build("mlp:6-4", 0).unwrap();
    let layers = prunable_layers(&g);
    let l = &layers[0];
    let w = weight_host(&g, l).unwrap();
    let a: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let m = magnitude_mask(&a, 12);
    let x = Tensor::from_vec(random(18, 3), (3, 6), &Device::Cpu).unwrap();
    let mt = Tensor::from_vec(m.clone(), (4, 6), &Device::Cpu).unwrap();
    for ste in [true, false] {
        let wm: HashMap<usize, WeightMask> = [(
            l.node,
            WeightMask {
                mask: mt.clone(),
                straight_through: ste,
            },
        )]
        .into();
        let o = ForwardOpts {
            weight_masks: Some(&wm),
            ..ForwardOpts::new(Mode::Train)
        };
        let y = forward_with(&g, &x, &o).unwrap().outputs.remove(0);
        let h = g.deep_clone().unwrap();
        apply_masks(&h, &layers, std::slice::from_ref(&m)).unwrap();
        let y2 = forward(&h, &x, Mode::Train).unwrap();
        for (p, q) in vals(&y).iter().zip(vals(&y2)) {
            assert!((p - q).abs() < 1e-6);
        }
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let gr = loss.backward().unwrap();
        let gw = vals(
            gr.get(g.param(l.node, "weight").unwrap().as_tensor())
                .unwrap(),
        );
        // dL/dW̃ = 2·yᵀx (y: [3,4], x: [3,6]).
        let yv = vals(&y2);
        let xv = vals(&x);
        for o_ in 0..4 {
            for i in 0..6 {
                let want: f32 = (0..3).map(|b| 2.0 * yv[b * 4 + o_] * xv[b * 6 + i]).sum();
                let want = if ste { want } else { want * m[o_ * 6 + i] };
                assert!(
                    (gw[o_ * 6 + i] - want).abs() < 1e-4,
                    "ste {ste}: {} vs {want}",
                    gw[o_ * 6 + i]
                );
            }
        }
    }
}

#[test]
fn sr_ste_gradient_adds_the_decay_on_pruned_entries_only() {
    use lopper::methods::unipts::dst::sr_ste_grad;
    let d = Device::Cpu;
    let g = Tensor::new(&[0.1f32, -0.2, 0.3, 0.4], &d).unwrap();
    let m = Tensor::new(&[1f32, 0., 1., 0.], &d).unwrap();
    let w = Tensor::new(&[2f32, -3., 4., 5.], &d).unwrap();
    let r = vals(&sr_ste_grad(&g, &m, &w, 5e-5).unwrap());
    let want = [0.1, -0.2 + 5e-5 * -3.0, 0.3, 0.4 + 5e-5 * 5.0];
    for (a, b) in r.iter().zip(want) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }
}

#[test]
fn mask_dynamics_regrow_a_weight_that_overtakes_the_kth() {
    use lopper::methods::unipts::dst::{current_masks, Budget};
    let g = zoo::build("mlp:6-4", 0).unwrap();
    let layers = prunable_layers(&g);
    let budget = Budget::Zeros(vec![16]);
    let m0 = current_masks(&g, &layers, &budget).unwrap();
    let w = weight_host(&g, &layers[0]).unwrap();
    let pruned = m0[0].iter().position(|v| *v == 0.0).unwrap();
    let kept_min = (0..24)
        .filter(|&i| m0[0][i] == 1.0)
        .min_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()))
        .unwrap();
    let mut w2 = w.clone();
    let top = w.iter().fold(0f32, |a, v| a.max(v.abs()));
    w2[pruned] = 2.0 * top;
    g.set_param(
        &layers[0].key,
        &Tensor::from_vec(w2, (4, 6), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let m1 = current_masks(&g, &layers, &budget).unwrap();
    assert_eq!(m1[0][pruned], 1.0, "the grown weight is active");
    assert_eq!(m1[0][kept_min], 0.0, "the smallest kept weight dropped out");
    assert_eq!(
        m1[0].iter().filter(|v| **v == 0.0).count(),
        16,
        "non-zeros per layer constant"
    );
}

#[test]
fn folded_batchnorm_matches_eval_forward() {
    for spec in ["resnet8@3x8x8", "mobilenetv2@3x8x8"] {
        let g = zoo::build(spec, 3).unwrap();
        randomise_bn(&g, 4);
        let f = fold_batchnorm(&g).unwrap();
        assert!(f.nodes.iter().all(|n| n.op.kind() != "BatchNorm"
            || !matches!(f.nodes[n.inputs[0]].op, lopper::graph::Op::Conv2d(_))));
        let x = Tensor::from_vec(random(2 * 3 * 64, 5), (2, 3, 8, 8), &Device::Cpu).unwrap();
        let a = vals(&forward(&g, &x, Mode::Eval).unwrap());
        let b = vals(&forward(&f, &x, Mode::Eval).unwrap());
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-4 * (1.0 + p.abs()), "{spec}: {p} vs {q}");
        }
    }
}

#[test]
fn bn_reset_and_recalibration() {
    let g = zoo::build("resnet8@1x8x8", 0).unwrap();
    randomise_bn(&g, 1);
    reset_bn(&g).unwrap();
    for (k, v) in g.params() {
        if k.ends_with("running_mean") {
            assert!(vals(v.as_tensor()).iter().all(|x| *x == 0.0));
        }
        if k.ends_with("running_var") {
            assert!(vals(v.as_tensor()).iter().all(|x| *x == 1.0));
        }
    }
    // The cumulative re-estimation over one batch holding all the data gives the data's
    // own statistics; the same pass in two batches gives the same (cumulative mean).
    let ds = data::load("digits", Split::Train, None)
        .unwrap()
        .sample(256, 0)
        .unwrap();
    let one = g.deep_clone().unwrap();
    let two = g.deep_clone().unwrap();
    use lopper::sparse::bn::{recalibrate_bn, RecalibOpts};
    recalibrate_bn(
        &one,
        &ds,
        &RecalibOpts {
            batch: 256,
            ..Default::default()
        },
    )
    .unwrap();
    recalibrate_bn(
        &two,
        &ds,
        &RecalibOpts {
            batch: 128,
            ..Default::default()
        },
    )
    .unwrap();
    let k = "bn1.running_mean";
    let (a, b) = (
        vals(one.params()[k].as_tensor()),
        vals(two.params()[k].as_tensor()),
    );
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() < 1e-4, "{p} vs {q}");
    }
    assert!(a.iter().any(|v| v.abs() > 1e-3));
}

#[test]
fn pot_weight_correction_matches_the_spec_vector() {
    let mut w = [1f32, 2., 3., 4.];
    let m = magnitude_mask(&w.map(|v| v.abs()), 2);
    assert_eq!(m, vec![0.0, 0.0, 1.0, 1.0]);
    let (rho, mu) = correct_channel(&mut w, &m);
    assert!((rho - 0.626224).abs() < 1e-6, "rho {rho}");
    assert!((mu - 1.404107).abs() < 1e-6, "mu {mu}");
    for (a, b) in w.iter().zip([0.0f64, 0.0, 3.282780, 3.909005]) {
        let a = *a as f64;
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn pot_bias_correction_restores_the_output_mean_on_the_mean_input() {
    let dense = zoo::build("resnet8@1x8x8", 2).unwrap();
    randomise_bn(&dense, 3);
    let fp = fold_batchnorm(&dense).unwrap();
    let net = fold_batchnorm(&dense).unwrap();
    let layers = prunable_layers(&net);
    uniform_magnitude(&net, &layers, 0.7, Pattern::Unstructured).unwrap();
    let ins: Vec<usize> = layers.iter().map(|l| fp.nodes[l.node].inputs[0]).collect();
    let mut keep = ins.clone();
    keep.extend(layers.iter().map(|l| l.node));
    let ds = data::load("digits", Split::Train, None)
        .unwrap()
        .sample(64, 0)
        .unwrap();
    let x = ds
        .batch(&(0..64).collect::<Vec<_>>(), None, &Device::Cpu)
        .unwrap()
        .0
        .into_images()
        .unwrap();
    let acts = forward_with(
        &fp,
        &x,
        &ForwardOpts {
            keep: &keep,
            ..ForwardOpts::new(Mode::Eval)
        },
    )
    .unwrap()
    .kept;
    bias_correction(&fp, &net, &layers, &ins, &acts).unwrap();
    // Check one conv: the sparse layer on a constant map of the FP input means has the FP
    // output's per-channel mean.
    let (l, inp) = (&layers[1], ins[1]);
    let xin = &acts[&inp];
    let c = xin.dim(1).unwrap();
    let xm: Vec<f32> = (0..c)
        .map(|ch| {
            vals(&xin.narrow(1, ch, 1).unwrap()).iter().sum::<f32>() / (xin.elem_count() / c) as f32
        })
        .collect();
    let (h, w_) = (xin.dim(2).unwrap(), xin.dim(3).unwrap());
    let cst: Vec<f32> = xm
        .iter()
        .flat_map(|&m| std::iter::repeat_n(m, h * w_))
        .collect();
    let cst = Tensor::from_vec(cst, (1, c, h, w_), &Device::Cpu).unwrap();
    let y = lopper::exec::apply_node(&net, l.node, &[&cst], Mode::Eval).unwrap();
    let yfp = &acts[&l.node];
    let oc = y.dim(1).unwrap();
    for o in 0..oc {
        let a = vals(&y.narrow(1, o, 1).unwrap());
        let b = vals(&yfp.narrow(1, o, 1).unwrap());
        let (ma, mb) = (
            a.iter().sum::<f32>() / a.len() as f32,
            b.iter().sum::<f32>() / b.len() as f32,
        );
        assert!(
            (ma - mb).abs() < 1e-3 * (1.0 + mb.abs()),
            "channel {o}: {ma} vs {mb}"
        );
    }
}

#[test]
fn masked_gradients_keep_zeros_through_optimizer_steps() {
    use lopper::train::{Optimizer, OptimizerKind};
    let d = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[0f32, 1.0, 0.0, -2.0], &d).unwrap()).unwrap();
    let m = Tensor::new(&[0f32, 1., 0., 1.], &d).unwrap();
    let params = vec![("w".to_string(), w.clone())];
    for kind in [
        OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: false,
        },
        OptimizerKind::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    ] {
        let mut opt = Optimizer::new(kind, 1e-4);
        for _ in 0..5 {
            let wm = (w.as_tensor() * &m).unwrap();
            let loss = (wm - 3.0).unwrap().sqr().unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            opt.step(&params, &g, 0.01).unwrap();
        }
        let v = vals(w.as_tensor());
        assert_eq!((v[0], v[2]), (0.0, 0.0));
        assert!(v[1] != 1.0);
    }
}

#[test]
fn csr_roundtrip_and_products_match_dense() {
    let (rows, cols, n) = (37, 53, 29);
    let mut w = random(rows * cols, 7);
    let a: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let m = magnitude_mask(&a, rows * cols * 8 / 10);
    w.iter_mut().zip(&m).for_each(|(w, m)| *w *= m);
    let csr = CsrMatrix::from_dense(&w, rows, cols).unwrap();
    csr.validate().unwrap();
    assert_eq!(csr.to_dense(), w);
    assert_eq!(csr.nnz(), rows * cols - rows * cols * 8 / 10);
    let b = random(cols * n, 8);
    let mut out = vec![0f32; rows * n];
    csr.spmm(&b, n, &mut out);
    for r in 0..rows {
        for j in 0..n {
            let want: f32 = (0..cols).map(|k| w[r * cols + k] * b[k * n + j]).sum();
            assert!((out[r * n + j] - want).abs() < 1e-4);
        }
    }
    let x = random(3 * cols, 9);
    let mut y = vec![0f32; 3 * rows];
    csr.spmv_rows(&x, 3, &mut y);
    for bb in 0..3 {
        for r in 0..rows {
            let want: f32 = (0..cols).map(|k| w[r * cols + k] * x[bb * cols + k]).sum();
            assert!((y[bb * rows + r] - want).abs() < 1e-4);
        }
    }
    let mut bad = csr.clone();
    bad.col_idx[0] = cols as u32;
    assert!(bad.validate().is_err());
}

#[test]
fn sparsity_report_counts_zeros() {
    let g = zoo::build("lenet5", 0).unwrap();
    let layers = prunable_layers(&g);
    uniform_magnitude(&g, &layers, 0.5, Pattern::Unstructured).unwrap();
    let (rows, s) = sparsity_report(&g).unwrap();
    assert_eq!(rows.len(), layers.len());
    let n: usize = rows.iter().map(|r| r.numel).sum();
    let z: usize = layers.iter().map(|l| l.numel() / 2).sum();
    assert!((s - z as f64 / n as f64).abs() < 1e-12);
}

#[test]
fn sparse_kernels_match_the_dense_forward() {
    for (spec, shape) in [
        ("resnet8@3x8x8", vec![3, 3, 8, 8]),
        ("mobilenetv2@3x8x8", vec![3, 3, 8, 8]),
        ("mlp:48-40-30-10", vec![5, 48]),
        ("lenet5", vec![2, 1, 28, 28]),
    ] {
        let g = zoo::build(spec, 1).unwrap();
        randomise_bn(&g, 2);
        let layers = prunable_layers(&g);
        uniform_magnitude(&g, &layers, 0.85, Pattern::Unstructured).unwrap();
        let n: usize = shape.iter().product();
        let x = Tensor::from_vec(random(n, 3), shape.as_slice(), &Device::Cpu).unwrap();
        let dense = vals(&forward(&g, &x, Mode::Eval).unwrap());
        let opts = PlanOpts {
            sparse: Some(true),
            ..PlanOpts::default()
        };
        let plan = Plan::new(&g, Mode::Eval, &opts).unwrap();
        assert!(plan.sparse_layers() > 0, "{spec}: no layer packed");
        let run =
            |plan: &Plan, x: &Tensor| vals(&plan.run(&g, x, &Feeds::default()).unwrap().outputs[0]);
        let sparse = run(&plan, &x);
        for (p, q) in dense.iter().zip(&sparse) {
            assert!((p - q).abs() < 1e-4 * (1.0 + p.abs()), "{spec}: {p} vs {q}");
        }
        // One sample at a time too (the batch-1 paths).
        let one = run(&plan, &x.narrow(0, 0, 1).unwrap());
        for (p, q) in dense.iter().zip(&one) {
            assert!(
                (p - q).abs() < 1e-4 * (1.0 + p.abs()),
                "{spec} b1: {p} vs {q}"
            );
        }
        // A plan built after a packed weight changed runs on the new weight.
        let l = &layers[layers.len() - 1];
        let w = g.param(l.node, "weight").unwrap().as_tensor().clone();
        g.set_param(&l.key, &(w * 2.0).unwrap()).unwrap();
        let dense2 = vals(&forward(&g, &x, Mode::Eval).unwrap());
        assert!(dense2 != dense, "{spec}: the weight change shows");
        let sparse2 = run(&Plan::new(&g, Mode::Eval, &opts).unwrap(), &x);
        for (p, q) in dense2.iter().zip(&sparse2) {
            assert!((p - q).abs() < 1e-4 * (1.0 + p.abs()), "{spec}: {p} vs {q}");
        }
    }
}

#[test]
fn sparse_models_are_saved_compressed_and_load_back_identically() {
    use lopper::graph::io;
    let g = zoo::build("resnet8@1x8x8", 4).unwrap();
    randomise_bn(&g, 5);
    let dir = std::env::temp_dir().join(format!("lopper-sparse-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dense_path = dir.join("dense.safetensors");
    io::save(&g, &dense_path).unwrap();
    let layers = prunable_layers(&g);
    uniform_magnitude(&g, &layers, 0.9, Pattern::Unstructured).unwrap();
    let p = dir.join("sparse.safetensors");
    io::save(&g, &p).unwrap();
    let (ds, ss) = (
        std::fs::metadata(&dense_path).unwrap().len(),
        std::fs::metadata(&p).unwrap().len(),
    );
    assert!(ss * 2 < ds, "compressed {ss} bytes vs dense {ds}");
    let back = io::load(&p).unwrap();
    assert!(
        back.sparse_kernels(),
        "loaded sparse models use the sparse kernels"
    );
    let plan = Plan::new(&back, Mode::Eval, &PlanOpts::default()).unwrap();
    assert!(
        plan.sparse_layers() > 0,
        "their eval plans pack the sparse layers"
    );
    for (k, v) in g.params() {
        assert_eq!(
            vals(v.as_tensor()),
            vals(back.params()[k].as_tensor()),
            "{k}"
        );
    }
    let x = Tensor::from_vec(random(2 * 64, 6), (2, 1, 8, 8), &Device::Cpu).unwrap();
    let a = vals(&forward(&g, &x, Mode::Eval).unwrap());
    let b = vals(&forward(&back, &x, Mode::Eval).unwrap());
    for (p_, q) in a.iter().zip(&b) {
        assert!((p_ - q).abs() < 1e-4 * (1.0 + p_.abs()));
    }
    // A corrupt column index is an error naming the tensor, not a panic.
    let bytes = std::fs::read(&p).unwrap();
    let (mut t, meta) = io::tensors_from_bytes(&bytes, "x").unwrap();
    let key = format!("{}.csr_col_idx", layers[1].key);
    let mut ci: Vec<u32> = t[&key].to_vec1().unwrap();
    ci[0] = 1_000_000;
    let n = ci.len();
    t.insert(key.clone(), Tensor::from_vec(ci, n, &Device::Cpu).unwrap());
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, io::tensors_to_bytes(&t, meta).unwrap()).unwrap();
    let e = format!("{:#}", io::load(&bad).unwrap_err());
    assert!(
        e.contains(&layers[1].key) && e.contains("bad.safetensors"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// SparseGPT on one matrix: with uncorrelated unit-variance inputs (`H = I`) there is
/// nothing to compensate, so it is magnitude pruning per block with the kept weights
/// unchanged; with correlated inputs its updates reconstruct the layer's outputs better
/// than magnitude pruning at the same sparsity; N:M holds in every group.
#[test]
fn sparsegpt_matrix_properties() {
    use lopper::methods::pts::sparsegpt::prune_matrix;
    let (rows, k) = (6usize, 40usize);
    let w: Vec<f64> = random(rows * k, 3).iter().map(|&v| v as f64).collect();
    // H = I: magnitude within the block (40 columns < 128: one block), no updates.
    let mut eye = vec![0f64; k * k];
    (0..k).for_each(|j| eye[j * k + j] = 1.0);
    let mut w1 = w.clone();
    let keep = prune_matrix(&mut w1, rows, k, &mut eye, 0.5, Pattern::Unstructured).unwrap();
    assert_eq!(keep.iter().filter(|&&x| !x).count(), rows * k / 2);
    let mut mags: Vec<f64> = w.iter().map(|v| v.abs()).collect();
    mags.sort_by(|a, b| a.total_cmp(b));
    let thresh = mags[rows * k / 2 - 1];
    for (i, (&a, &b)) in w.iter().zip(&w1).enumerate() {
        if keep[i] {
            assert!(
                a.abs() > thresh - 1e-12 && (a - b).abs() < 1e-12,
                "kept weight moved"
            );
        } else {
            assert!(a.abs() <= thresh + 1e-12 && b == 0.0);
        }
    }
    // Correlated inputs X (n × k): the output error ‖X(W' − W)ᵀ‖ beats magnitude's.
    let n = 400;
    let base = random(n * 4, 5);
    let noise = random(n * k, 6);
    let x: Vec<f64> = (0..n * k)
        .map(|i| {
            let (r, c) = (i / k, i % k);
            base[r * 4 + c % 4] as f64 + 0.3 * noise[i] as f64
        })
        .collect();
    let mut h = vec![0f64; k * k];
    for r in 0..n {
        for a in 0..k {
            for b in 0..k {
                h[a * k + b] += x[r * k + a] * x[r * k + b];
            }
        }
    }
    let out_err = |wp: &[f64]| -> f64 {
        (0..n)
            .flat_map(|r| (0..rows).map(move |o| (r, o)))
            .map(|(r, o)| {
                (0..k)
                    .map(|c| x[r * k + c] * (wp[o * k + c] - w[o * k + c]))
                    .sum::<f64>()
                    .powi(2)
            })
            .sum()
    };
    let mut w2 = w.clone();
    let keep2 = prune_matrix(&mut w2, rows, k, &mut h.clone(), 0.6, Pattern::Unstructured).unwrap();
    assert_eq!(keep2.iter().filter(|&&x| !x).count(), (rows * k * 6) / 10);
    assert!(w2.iter().zip(&keep2).all(|(&v, &kp)| kp || v == 0.0));
    let mut mag = w.clone();
    let mut order: Vec<usize> = (0..rows * k).collect();
    order.sort_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()));
    order[..(rows * k * 6) / 10]
        .iter()
        .for_each(|&i| mag[i] = 0.0);
    let (e_gpt, e_mag) = (out_err(&w2), out_err(&mag));
    assert!(
        e_gpt < 0.5 * e_mag,
        "SparseGPT {e_gpt} vs magnitude {e_mag}"
    );
    // 2:4 in every row.
    let mut w3 = w.clone();
    let keep3 = prune_matrix(&mut w3, rows, k, &mut h, 0.5, Pattern::NM { n: 2, m: 4 }).unwrap();
    for grp in keep3.chunks(4) {
        assert_eq!(grp.iter().filter(|&&x| x).count(), 2);
    }
}

/// On a trained net and real data, SparseGPT at 70 % keeps more accuracy than magnitude
/// pruning (both with the batch-norm re-estimation of the one-shot baselines).
#[test]
fn sparsegpt_beats_magnitude_on_digits() {
    use lopper::methods::sparsify::{self, SparsifyJob, SparsifyMethod};
    use lopper::train::{self, TrainConfig, TrainOpts};
    let tr = data::load("digits", Split::Train, None).unwrap();
    let te = data::load("digits", Split::Test, None).unwrap();
    let g = zoo::build("resnet8@1x8x8", 0).unwrap();
    let cfg = TrainConfig {
        epochs: 4,
        batch_size: 64,
        lr: 0.05,
        crop_pad: 1,
        ..Default::default()
    };
    train::train(&g, &tr, &cfg, &TrainOpts::default()).unwrap();
    let calib = tr.sample(256, 0).unwrap();
    let acc = |method: SparsifyMethod, name: &str| {
        let job = SparsifyJob {
            method,
            target: 0.7,
            pattern: Pattern::Unstructured,
            recalib: true,
            seed: 0,
            curve: false,
            method_name: name.into(),
        };
        let out = sparsify::run(&g, &calib, &te, &job, &lopper::util::Silent).unwrap();
        let (_, total) = sparsity_report(&out.graph).unwrap();
        assert!((total - 0.7).abs() < 0.01, "{name} sparsity {total}");
        train::evaluate(&out.graph, &te, 200).unwrap().top1
    };
    let (gpt, mag) = (
        acc(SparsifyMethod::SparseGpt, "sparsegpt"),
        acc(SparsifyMethod::Magnitude, "magnitude"),
    );
    assert!(gpt > mag, "SparseGPT {gpt} vs magnitude {mag}");
}
