//! Transformers (issue 20), first part: the channels-first ViT of the zoo, its ops
//! against naive references, heads / FFN units / embedding as dependency units, surgery
//! of heads against masking, training on real data, and clear errors.

use candle_core::{Device, Tensor};
use lopper::data::{self, Split};
use lopper::exec::{forward, Mode};
use lopper::graph::cost::cost;
use lopper::graph::ops::Op;
use lopper::graph::Graph;
use lopper::prune::{dependency_groups, predict_cost, remove_units, Removal};
use lopper::train::{self, TrainConfig, TrainOpts};
use lopper::zoo;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

mod common;
use common::{randomise_bn, vals};

fn input(g: &Graph, n: usize, seed: u64) -> Tensor {
    let mut rng = Pcg64::seed_from_u64(seed);
    let mut dims = vec![n];
    dims.extend(g.input_shape());
    let len: usize = dims.iter().product();
    let v: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn set(g: &Graph, key: &str, v: Vec<f32>) {
    let p = &g.params()[key];
    p.set(&Tensor::from_vec(v, p.dims(), &Device::Cpu).unwrap())
        .unwrap();
}

fn get(g: &Graph, key: &str) -> Vec<f32> {
    vals(g.params()[key].as_tensor())
}

/// A one-block ViT whose attention output is the graph output's input: the naive f64
/// attention and LayerNorm below must reproduce the executor's values.
#[test]
fn attention_and_layer_norm_match_naive_references() {
    let g = zoo::build("vit:12-1-3-2@2x4x6", 3).unwrap();
    randomise_bn(&g, 1);
    for k in ["blocks.0.norm1.weight", "pos_embed.weight"] {
        let n = get(&g, k).len();
        let mut rng = Pcg64::seed_from_u64(n as u64);
        set(&g, k, (0..n).map(|_| rng.gen_range(0.5..1.5)).collect());
    }
    let x = input(&g, 2, 5);
    let names = [
        "pos_embed",
        "blocks.0.norm1",
        "blocks.0.attn.in_proj",
        "blocks.0.attn",
    ];
    let keep: Vec<usize> = names.iter().map(|n| g.node_id(n).unwrap()).collect();
    let opts = lopper::exec::ForwardOpts {
        keep: &keep,
        ..lopper::exec::ForwardOpts::new(Mode::Eval)
    };
    let out = lopper::exec::forward_with(&g, &x, &opts).unwrap();
    let value = |name: &str| vals(&out.kept[&g.node_id(name).unwrap()]);
    let (dim, heads, d, t) = (12usize, 3usize, 4usize, 6usize);
    // LayerNorm: over the 12 channels at each of the 6 positions.
    let ln_in = value("pos_embed");
    let ln_out = value("blocks.0.norm1");
    let (gamma, beta) = (
        get(&g, "blocks.0.norm1.weight"),
        get(&g, "blocks.0.norm1.bias"),
    );
    for n in 0..2 {
        for p in 0..t {
            let col: Vec<f64> = (0..dim)
                .map(|c| ln_in[(n * dim + c) * t + p] as f64)
                .collect();
            let mean = col.iter().sum::<f64>() / dim as f64;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
            for c in 0..dim {
                let want = (col[c] - mean) / (var + 1e-5).sqrt() * gamma[c] as f64 + beta[c] as f64;
                let got = ln_out[(n * dim + c) * t + p] as f64;
                assert!(
                    (want - got).abs() < 1e-4,
                    "LayerNorm {n},{c},{p}: {got} vs {want}"
                );
            }
        }
    }
    // Attention: per head, softmax over keys of q·k/√d, then the values' weighted sum.
    let qkv = value("blocks.0.attn.in_proj");
    let att = value("blocks.0.attn");
    for n in 0..2 {
        let at = |c: usize, p: usize| qkv[(n * 3 * dim + c) * t + p] as f64;
        for h in 0..heads {
            for tq in 0..t {
                let logits: Vec<f64> = (0..t)
                    .map(|s| {
                        (0..d)
                            .map(|j| at(h * d + j, tq) * at(dim + h * d + j, s))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..d {
                    let want: f64 = (0..t).map(|s| e[s] / z * at(2 * dim + h * d + j, s)).sum();
                    let got = att[(n * dim + h * d + j) * t + tq] as f64;
                    assert!(
                        (want - got).abs() < 1e-4,
                        "attention {n},{h},{j},{tq}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn vit_units_are_heads_ffn_units_and_a_kept_embedding() {
    let g = zoo::build("vit:32-2-4-4@3x16x16", 0).unwrap();
    let groups = dependency_groups(&g).unwrap();
    let id = |n: &str| g.node_id(n).unwrap();
    let group_of = |n: &str| &groups.groups[groups.owner[id(n)][0].0];
    // in_proj's 96 channels and the attention's 32 outputs form 4 head units of 4·8.
    let heads = group_of("blocks.0.attn.in_proj");
    assert_eq!(heads.units.len(), 4);
    assert_eq!(heads.prunable_units().len(), 4);
    for u in &heads.units {
        assert_eq!(
            u.elems.len(),
            4 * 8,
            "q, k, v and output channels of one head"
        );
    }
    assert!(heads
        .members
        .iter()
        .any(|m| g.nodes[m.node].name == "blocks.0.attn.out_proj" && m.axis == 1));
    assert_ne!(
        groups.owner[id("blocks.0.attn.in_proj")][0].0,
        groups.owner[id("blocks.1.attn.in_proj")][0].0
    );
    // fc1's 64 hidden units, each with its fc2 column.
    let ffn = group_of("blocks.1.mlp.fc1");
    assert_eq!(ffn.prunable_units().len(), 64);
    // The embedding dimension: one group through patch embedding, every residual add
    // and LayerNorm, kept at full width.
    let emb = group_of("patch_embed");
    assert!(std::ptr::eq(emb, group_of("blocks.1.norm2")));
    assert!(std::ptr::eq(emb, group_of("norm")));
    assert!(emb.units.iter().all(|u| u.blocked));
}

/// Removing heads equals zeroing their value rows in the dense model (a head whose values
/// are zero contributes nothing, whatever its attention), and the cost model predicts
/// the pruned MACs (attention's T² terms included).
#[test]
fn removing_heads_equals_zeroing_their_values() {
    let g = zoo::build("vit:32-2-4-4@3x16x16", 4).unwrap();
    randomise_bn(&g, 2);
    let groups = dependency_groups(&g).unwrap();
    let id = |n: &str| g.node_id(n).unwrap();
    let gi = groups.owner[id("blocks.1.attn.in_proj")][0].0;
    // Heads 0 and 2 of block 1.
    let units: Vec<(usize, usize)> = [0usize, 2].iter().map(|&h| (gi, h)).collect();
    let removal = Removal::from_units(&g, &groups, &units).unwrap();
    let pruned = remove_units(&g, &groups, &removal).unwrap();
    let Op::MultiHeadAttention(a) = &pruned.nodes[pruned.node_id("blocks.1.attn").unwrap()].op
    else {
        panic!("attention node kept its op");
    };
    assert_eq!(a.heads, 2);
    let x = input(&g, 2, 9);
    let small = vals(&forward(&pruned, &x, Mode::Eval).unwrap());
    // Zero the value rows of heads 0 and 2 (third 2 of in_proj's rows) in the dense model.
    let (w, b) = ("blocks.1.attn.in_proj.weight", "blocks.1.attn.in_proj.bias");
    let (mut wv, mut bv) = (get(&g, w), get(&g, b));
    for h in [0usize, 2] {
        for r in 64 + h * 8..64 + (h + 1) * 8 {
            wv[r * 32..(r + 1) * 32].iter_mut().for_each(|v| *v = 0.0);
            bv[r] = 0.0;
        }
    }
    set(&g, w, wv);
    set(&g, b, bv);
    let dense = vals(&forward(&g, &x, Mode::Eval).unwrap());
    for (a, b) in dense.iter().zip(&small) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    let predicted = predict_cost(&g, &groups, &removal).unwrap();
    let actual = cost(&pruned).unwrap();
    assert_eq!(predicted.total_macs, actual.total_macs);
    // Two of four heads: in_proj, attention and out_proj of block 1 lose half their MACs.
    assert!(actual.total_macs < cost(&g).unwrap().total_macs);
}

#[test]
fn vit_learns_digits() {
    let tr = data::load("digits", Split::Train, None).unwrap();
    let te = data::load("digits", Split::Test, None).unwrap();
    let g = zoo::build("vit:32-2-4-2@1x8x8", 0).unwrap();
    // AdamW with warm-up, the usual ViT recipe (SGD reached 69 % in as many epochs).
    let cfg = TrainConfig {
        epochs: 16,
        batch_size: 32,
        lr: 2e-3,
        weight_decay: 0.05,
        optimizer: lopper::train::OptimizerKind::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        warmup_epochs: 1.0,
        ..Default::default()
    };
    train::train(&g, &tr, &cfg, &TrainOpts::default()).unwrap();
    let ev = train::evaluate(&g, &te, 100).unwrap();
    assert!(ev.top1 > 0.85, "digits accuracy {}", ev.top1);
}

#[test]
fn bad_transformer_shapes_are_clear_errors() {
    let e = format!("{:#}", zoo::build("vit:30-1-4@3x16x16", 0).unwrap_err());
    assert!(e.contains("not divisible into 4 heads"), "{e}");
    let e = format!("{:#}", zoo::build("vit:32-1-4-5@3x16x16", 0).unwrap_err());
    assert!(e.contains("patch 5"), "{e}");
}

/// A ViT at another image size (DWR's resolution axis): the token count follows and the
/// position embedding is resampled over its grid; a grid that is a linear ramp stays one.
#[test]
fn changing_the_image_size_resamples_the_position_embedding() {
    use lopper::graph::ops::PosEmbed;
    let g = zoo::build("vit:32-2-4-4@3x16x16", 1).unwrap();
    // A ramp over the 4×4 grid: e[c, y, x] = c + y + 2x.
    let ramp: Vec<f32> = (0..32)
        .flat_map(|c| (0..16).map(move |p| (c + p / 4 + 2 * (p % 4)) as f32))
        .collect();
    set(&g, "pos_embed.weight", ramp);
    let big = lopper::prune::with_resolution(&g, 24, 24).unwrap();
    let Op::PosEmbed(p) = &big.nodes[big.node_id("pos_embed").unwrap()].op else {
        panic!("position embedding kept")
    };
    assert_eq!(p.tokens, 36);
    let e = get(&big, "pos_embed.weight");
    assert_eq!(e.len(), 32 * 36);
    // Interior samples of the 6×6 grid lie on the ramp (the border clamps to the edge).
    let at = |c: usize, y: usize, x: usize| e[c * 36 + y * 6 + x];
    let src = |y: f32, x: f32| y + 2.0 * x;
    for (y, x) in [(2usize, 2usize), (3, 2), (2, 3), (3, 3)] {
        let (sy, sx) = (
            (y as f32 + 0.5) * 4.0 / 6.0 - 0.5,
            (x as f32 + 0.5) * 4.0 / 6.0 - 0.5,
        );
        assert!((at(5, y, x) - (5.0 + src(sy, sx))).abs() < 1e-4);
    }
    let x = input(&big, 2, 3);
    assert_eq!(forward(&big, &x, Mode::Eval).unwrap().dims(), &[2, 10]);
    // Same size: unchanged.
    let w = get(&g, "pos_embed.weight");
    assert_eq!(PosEmbed::resample(&w, 32, &[4, 4], &[4, 4]).unwrap(), w);
}

/// `--prune-embedding`: the embedding becomes one ordinary group (patch embedding, every
/// residual add, LayerNorm and position embedding); removing some of its channels gives a
/// valid, smaller graph whose MACs the cost model predicts.
#[test]
fn the_embedding_is_prunable_on_request() {
    let g = zoo::build("vit:32-2-4-4@3x16x16", 5).unwrap();
    let g = lopper::prune::allow_embedding_pruning(&g).unwrap();
    let groups = dependency_groups(&g).unwrap();
    let gi = groups.owner[g.node_id("patch_embed").unwrap()][0].0;
    let emb = &groups.groups[gi];
    assert_eq!(emb.prunable_units().len(), 32);
    assert_eq!(gi, groups.owner[g.node_id("blocks.1.norm2").unwrap()][0].0);
    let units: Vec<(usize, usize)> = (0..32).step_by(3).map(|u| (gi, u)).collect();
    let removal = Removal::from_units(&g, &groups, &units).unwrap();
    let pruned = remove_units(&g, &groups, &removal).unwrap();
    assert_eq!(get(&pruned, "pos_embed.weight").len(), (32 - 11) * 16);
    assert_eq!(get(&pruned, "norm.weight").len(), 32 - 11);
    let y = forward(&pruned, &input(&pruned, 2, 1), Mode::Eval).unwrap();
    assert_eq!(y.dims(), &[2, 10]);
    assert_eq!(
        predict_cost(&g, &groups, &removal).unwrap().total_macs,
        cost(&pruned).unwrap().total_macs
    );
}

/// A class-token ViT: the token is one more position (`[D, 1 + T, 1]`), the classifier
/// reads it back; at another image size the token's embedding is kept and the grid behind
/// it resampled.
#[test]
fn class_token_vit_runs_and_resizes() {
    let g = zoo::build("vit:32-2-4-4-2-cls@3x16x16", 2).unwrap();
    let shapes = g.shapes().unwrap();
    assert_eq!(shapes[g.node_id("class_token").unwrap()], vec![32, 17, 1]);
    let e: Vec<f32> = (0..32 * 17).map(|i| i as f32).collect();
    set(&g, "pos_embed.weight", e.clone());
    let big = lopper::prune::with_resolution(&g, 24, 24).unwrap();
    let e2 = get(&big, "pos_embed.weight");
    assert_eq!(e2.len(), 32 * 37);
    for c in 0..32 {
        assert_eq!(
            e2[c * 37],
            e[c * 17],
            "class token embedding of channel {c} kept"
        );
    }
    let y = forward(&big, &input(&big, 2, 4), Mode::Eval).unwrap();
    assert_eq!(y.dims(), &[2, 10]);
}

/// An eval pass without gradients writes the class token and adds the position embedding
/// in its own loops; with gradients they are candle's ops: the same bits either way (a
/// class-token ViT at batch 3, random token and embedding).
#[test]
fn class_token_and_pos_embed_no_grad_paths_match() {
    use lopper::exec::{Feeds, Plan, PlanOpts};
    let g = zoo::build("vit:32-2-4-4-2-cls@3x16x16", 5).unwrap();
    let mut rng = Pcg64::seed_from_u64(9);
    let mut rand = |n: usize| {
        (0..n)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect::<Vec<f32>>()
    };
    set(&g, "pos_embed.weight", rand(32 * 17));
    let tok = g
        .params()
        .keys()
        .find(|k| k.starts_with("class_token"))
        .unwrap()
        .clone();
    let n = g.params()[&tok].as_tensor().elem_count();
    set(&g, &tok, rand(n));
    let x = input(&g, 3, 6);
    let run = |grad: bool| {
        let opts = PlanOpts {
            grad,
            ..Default::default()
        };
        let plan = Plan::new(&g, Mode::Eval, &opts).unwrap();
        vals(&plan.run(&g, &x, &Feeds::default()).unwrap().outputs[0])
    };
    let (fast, reference) = (run(false), run(true));
    assert_eq!(fast.len(), 30);
    assert!(
        fast.iter()
            .zip(&reference)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{fast:?} vs {reference:?}"
    );
}
