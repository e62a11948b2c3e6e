//! STAMP's Beta-Bernoulli gates against the spec's golden values
//! (`reference/dwr_golden_output.txt`, first section; α = 1e-4, u = 0.3).
#![allow(clippy::approx_constant)] // the golden table is printed to 6 decimals

use lopper::methods::stamp::bbdrop::{ab, eval_gate, kl, kl_grad_uc, mean_pi, sample_pi, ALPHA};
use lopper::methods::stamp::special::{digamma, lgamma, trigamma};
use rand::{Rng, SeedableRng};

const GOLDEN: [[f64; 7]; 4] = [
    [
        2.0, 0.5413, 2.126928, 0.999984, 0.680200, 8.965076, 0.845615,
    ],
    [
        -1.0, 0.5413, 0.313262, 0.999984, 0.238541, 7.049953, 0.320280,
    ],
    [0.0, 0.0, 0.693147, 0.693147, 0.509616, 8.139809, 0.756254],
    [3.0, 2.0, 3.048587, 2.126928, 0.637193, 9.000984, 0.759471],
];

#[test]
fn special_functions() {
    assert!((lgamma(1.0)).abs() < 1e-13 && (lgamma(2.0)).abs() < 1e-13);
    assert!((lgamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
    assert!((lgamma(10.0) - 362880f64.ln()).abs() < 1e-11);
    assert!((digamma(1.0) + 0.577_215_664_901_532_9).abs() < 1e-12);
    assert!((trigamma(1.0) - std::f64::consts::PI.powi(2) / 6.0).abs() < 1e-12);
    for x in [0.3, 1.7, 4.2, 11.0] {
        let h = 1e-5;
        let d = (lgamma(x + h) - lgamma(x - h)) / (2.0 * h);
        assert!((d - digamma(x)).abs() < 1e-8, "{x}");
        let t = (digamma(x + h) - digamma(x - h)) / (2.0 * h);
        assert!((t - trigamma(x)).abs() < 1e-6, "{x}");
    }
}

#[test]
fn golden_values() {
    for g in GOLDEN {
        let (a, b) = ab(g[0], g[1]);
        assert!(
            (a - g[2]).abs() < 1e-6 && (b - g[3]).abs() < 1e-6,
            "{g:?}: {a} {b}"
        );
        assert!(
            (mean_pi(a, b) - g[4]).abs() < 1e-6,
            "{g:?}: E[pi] {}",
            mean_pi(a, b)
        );
        assert!(
            (kl(a, b, ALPHA) - g[5]).abs() < 1e-5,
            "{g:?}: KL {}",
            kl(a, b, ALPHA)
        );
        assert!((sample_pi(a, b, 0.3) - g[6]).abs() < 1e-6, "{g:?}");
    }
}

#[test]
fn monte_carlo_mean_and_kl_gradient() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
    for g in GOLDEN {
        let (a, b) = ab(g[0], g[1]);
        let n = 200_000;
        let m: f64 = (0..n).map(|_| sample_pi(a, b, rng.gen())).sum::<f64>() / n as f64;
        assert!((m - mean_pi(a, b)).abs() < 3e-3, "{g:?}: MC {m}");
        let (ga, gb) = kl_grad_uc(g[0], g[1], ALPHA);
        let h = 1e-6;
        let f = |x: f64, y: f64| {
            let (a, b) = ab(x, y);
            kl(a, b, ALPHA)
        };
        let na = (f(g[0] + h, g[1]) - f(g[0] - h, g[1])) / (2.0 * h);
        let nb = (f(g[0], g[1] + h) - f(g[0], g[1] - h)) / (2.0 * h);
        assert!(
            (ga - na).abs() < 1e-5 * (1.0 + na.abs()),
            "{g:?}: {ga} vs {na}"
        );
        assert!(
            (gb - nb).abs() < 1e-5 * (1.0 + nb.abs()),
            "{g:?}: {gb} vs {nb}"
        );
    }
}

#[test]
fn eval_gate_thresholds_the_mean() {
    assert!((eval_gate(2.0, 0.5413, 1e-3) - 0.680200).abs() < 1e-6);
    // A gate pushed far toward zero (tiny b → E[π] → 0) is removed.
    assert_eq!(eval_gate(-10.0, 50.0, 1e-3), 0.0);
}

mod set_encoder {
    use candle_core::{Device, Tensor};
    use lopper::methods::stamp::set_encoder::{Isab, Mab, Sab, SetEncoder};
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn encoder_is_permutation_invariant_and_sab_equivariant() {
        let (enc, _vm) = SetEncoder::init(12, 16, 4, 0).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 9, 12), &Device::Cpu).unwrap();
        let mut perm: Vec<u32> = (0..9).collect();
        perm.shuffle(&mut rand_pcg::Pcg64::seed_from_u64(1));
        let idx = Tensor::new(perm.as_slice(), &Device::Cpu).unwrap();
        let xp = x.index_select(&idx, 1).unwrap();
        let (a, b) = (
            vals(&enc.forward(&x).unwrap()),
            vals(&enc.forward(&xp).unwrap()),
        );
        assert_eq!(a.len(), 2 * 16);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
        // SAB permutes with its input.
        let s = enc.sab1.forward(&x).unwrap();
        let sp = enc.sab1.forward(&xp).unwrap();
        for (p, q) in vals(&s.index_select(&idx, 1).unwrap())
            .iter()
            .zip(vals(&sp))
        {
            assert!((p - q).abs() < 1e-5);
        }
        // Different sets, different embeddings.
        let y = (x.clone() * 2.0).unwrap();
        assert!(vals(&enc.forward(&y).unwrap())
            .iter()
            .zip(&a)
            .any(|(p, q)| (p - q).abs() > 1e-3));
        assert!(enc
            .forward(&Tensor::zeros((1, 0, 12), candle_core::DType::F32, &Device::Cpu).unwrap())
            .is_err());
        assert!(enc
            .forward(&Tensor::zeros((1, 3, 11), candle_core::DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }

    /// Spec §7.6: duplicating every element (X → X ∪ X) leaves the embedding unchanged —
    /// attention weights split evenly over the copies.
    #[test]
    fn duplicating_the_set_leaves_the_embedding_unchanged() {
        let (enc, _vm) = SetEncoder::init(6, 16, 4, 3).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 7, 6), &Device::Cpu).unwrap();
        let xx = Tensor::cat(&[&x, &x], 1).unwrap();
        let (a, b) = (
            vals(&enc.forward(&x).unwrap()),
            vals(&enc.forward(&xx).unwrap()),
        );
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
        // A set that is not a duplicate (one element doubled) does change it.
        let x1 = Tensor::cat(&[&x, &x.narrow(1, 0, 1).unwrap()], 1).unwrap();
        assert!(vals(&enc.forward(&x1).unwrap())
            .iter()
            .zip(&a)
            .any(|(p, q)| (p - q).abs() > 1e-5));
    }

    #[test]
    fn isab_is_equivariant_and_heads_must_divide() {
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &Device::Cpu);
        assert!(Mab::new(4, 4, 10, 3, vb.pp("bad")).is_err());
        let isab = Isab::new(5, 8, 2, 3, vb.pp("isab")).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 7, 5), &Device::Cpu).unwrap();
        let idx = Tensor::new(&[6u32, 0, 5, 1, 4, 2, 3], &Device::Cpu).unwrap();
        let a = isab.forward(&x).unwrap().index_select(&idx, 1).unwrap();
        let b = isab.forward(&x.index_select(&idx, 1).unwrap()).unwrap();
        for (p, q) in vals(&a).iter().zip(vals(&b)) {
            assert!((p - q).abs() < 1e-5);
        }
        let _ = Sab(Mab::new(5, 5, 8, 2, vb.pp("s")).unwrap());
    }
}

mod gated_equals_pruned {
    use candle_core::{Device, Tensor};
    use lopper::exec::{forward, forward_with, ForwardOpts, Mode};
    use lopper::graph::cost::cost;
    use lopper::methods::stamp::bbdrop::{eval_gate, THRES};
    use lopper::methods::stamp::gates::{fold_and_prune, gate_masks, gate_sites};
    use lopper::prune::dependency_groups;
    use lopper::zoo;
    use rand::{Rng, SeedableRng};

    #[test]
    fn nets_without_batch_norm_have_no_gate_sites() {
        let g = zoo::build("lenet5", 0).unwrap();
        assert!(gate_sites(&g, &dependency_groups(&g).unwrap()).is_empty());
    }

    #[test]
    fn eval_gated_network_equals_the_physically_pruned_one() {
        for (spec, shape) in [
            ("resnet8@3x8x8", [3usize, 8, 8]),
            ("vgg11@3x32x32", [3, 32, 32]),
        ] {
            let g = zoo::build(spec, 2).unwrap();
            let mut rng = rand_pcg::Pcg64::seed_from_u64(3);
            // Non-trivial BN statistics and affine parameters.
            for (k, v) in g.params() {
                let n = v.elem_count();
                let d: Vec<f32> = if k.ends_with("running_var") {
                    (0..n).map(|_| rng.gen_range(0.5..2.0)).collect()
                } else if k.ends_with("running_mean") || k.ends_with("bias") {
                    (0..n).map(|_| rng.gen_range(-0.5..0.5)).collect()
                } else {
                    continue;
                };
                v.set(&Tensor::from_vec(d, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
            }
            let groups = dependency_groups(&g).unwrap();
            let sites = gate_sites(&g, &groups);
            assert!(!sites.is_empty(), "{spec}: no gateable group");
            if spec.starts_with("resnet") {
                // Internal-only: one gated group per basic block (conv1's output).
                assert_eq!(sites.len(), 3, "{spec}");
            }
            // Random gate parameters; about a third of the gates close (E[π] < τ).
            let z: Vec<Vec<f32>> = sites
                .iter()
                .map(|s| {
                    (0..s.channels)
                        .map(|c| {
                            let (a_uc, b_uc) = if c == 0 || rng.gen_bool(0.65) {
                                (rng.gen_range(-1.0..3.0), rng.gen_range(-1.0..2.0))
                            } else {
                                (-10.0, 50.0)
                            };
                            eval_gate(a_uc, b_uc, THRES) as f32
                        })
                        .collect()
                })
                .collect();
            assert!(z.iter().flatten().any(|v| *v == 0.0));
            let zt: Vec<Tensor> = z
                .iter()
                .map(|v| Tensor::new(v.as_slice(), &Device::Cpu).unwrap())
                .collect();
            let masks = gate_masks(&g, &sites, &zt).unwrap();
            let n: usize = shape.iter().product();
            let x = Tensor::from_vec(
                (0..2 * n)
                    .map(|_| rng.gen_range(-1f32..1.0))
                    .collect::<Vec<_>>(),
                [2, shape[0], shape[1], shape[2]].as_slice(),
                &Device::Cpu,
            )
            .unwrap();
            let gated = forward_with(
                &g,
                &x,
                &ForwardOpts {
                    input_masks: Some(&masks),
                    ..ForwardOpts::new(Mode::Eval)
                },
            )
            .unwrap()
            .outputs
            .remove(0);
            let pruned = fold_and_prune(&g, &groups, &sites, &z).unwrap();
            assert!(cost(&pruned).unwrap().total_macs < cost(&g).unwrap().total_macs);
            let y = forward(&pruned, &x, Mode::Eval).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) = (
                gated.flatten_all().unwrap().to_vec1().unwrap(),
                y.flatten_all().unwrap().to_vec1().unwrap(),
            );
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-4 * (1.0 + p.abs()), "{spec}: {p} vs {q}");
            }
        }
    }
}

mod generator {
    use candle_core::{Device, Tensor, Var};
    use lopper::methods::stamp::bbdrop::{ab, kl, kl_grad_uc, mean_pi, ALPHA};
    use lopper::methods::stamp::generator::{
        kl_term, relaxed_bernoulli, rng, sample_gates, Generator, TEMPERATURE,
    };

    /// Spec §7.3: at temperature 0.1 the relaxed-Bernoulli sample mean is π (±0.01). At
    /// 0.01 the samples concentrate at 0 and 1; the fraction strictly inside (0.01, 0.99)
    /// is exactly `σ(δ−ℓ) − σ(−δ−ℓ)` with `δ = 0.01·logit(0.99)` ≈ `0.092·π(1−π)`, so the
    /// spec's "> 99 % at the ends" holds for π ≤ 0.12 or ≥ 0.88 (checked) but not for π near
    /// 1/2 (up to 2.3 % inside): there the exact fraction is checked instead.
    #[test]
    fn relaxed_bernoulli_mean_and_concentration() {
        let pis = [0.05f64, 0.3, 0.68, 0.95];
        let logits: Vec<f32> = pis.iter().map(|p| (p / (1.0 - p)).ln() as f32).collect();
        let logit = Tensor::new(logits.as_slice(), &Device::Cpu).unwrap();
        let mut r = rng(7);
        let n = 100_000;
        let z: Vec<Vec<f32>> = relaxed_bernoulli(&logit, n, TEMPERATURE, &mut r)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (c, &p) in pis.iter().enumerate() {
            let mean = z.iter().map(|row| row[c] as f64).sum::<f64>() / n as f64;
            assert!((mean - p).abs() < 0.01, "π {p}: mean {mean}");
        }
        let z: Vec<Vec<f32>> = relaxed_bernoulli(&logit, n, 0.01, &mut r)
            .unwrap()
            .to_vec2()
            .unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let delta = 0.01 * (0.99f64 / 0.01).ln();
        for (c, &p) in pis.iter().enumerate() {
            let inside = z
                .iter()
                .filter(|row| (0.01..=0.99).contains(&row[c]))
                .count() as f64
                / n as f64;
            let l = (p / (1.0 - p)).ln();
            let want = sig(delta - l) - sig(-delta - l);
            assert!((inside - want).abs() < 0.002, "π {p}: {inside} vs {want}");
            if !(0.12..=0.88).contains(&p) {
                assert!(inside < 0.01, "π {p}: {inside} inside (0.01, 0.99)");
            }
        }
    }

    #[test]
    fn initial_generator_reproduces_the_bbdropout_state() {
        let g = Generator::new(&[4, 6], 8).unwrap();
        let s = Tensor::new(&[0.3f32, -1.0, 2.0, 0.0, 0.5, 0.1, -0.2, 0.7], &Device::Cpu).unwrap();
        let p = g.params(&s).unwrap();
        assert_eq!(p.len(), 2);
        for (a_uc, b_uc) in &p {
            for (x, y) in a_uc
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .zip(b_uc.to_vec1::<f32>().unwrap())
            {
                let (a, b) = ab(*x as f64, y as f64);
                assert!((mean_pi(a, b) - 0.680200).abs() < 1e-5);
            }
        }
        assert!(g
            .params(&Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap())
            .is_err());
        assert_eq!(g.vars().len(), 4);
    }

    /// The centred generator reads only the direction of `s − centre`: scaling it changes
    /// nothing, and `track` moves the centre toward the embeddings it sees.
    #[test]
    fn centred_generator_reads_the_normalised_deviation() {
        let mut g = Generator::new(&[3], 4).unwrap();
        g.centered = true;
        g.w[0]
            .set(&Tensor::randn(0f32, 1.0, (6, 4), &Device::Cpu).unwrap())
            .unwrap();
        let s = Tensor::new(&[1.0f32, -2.0, 0.5, 3.0], &Device::Cpu).unwrap();
        g.track(&s).unwrap();
        let c: Vec<f32> = g.center.as_tensor().to_vec1().unwrap();
        assert_eq!(c, vec![0.1, -0.2, 0.05, 0.3]);
        let far = ((&s - g.center.as_tensor()).unwrap() * 5.0).unwrap();
        let far = (far + g.center.as_tensor()).unwrap();
        let (p, q) = (g.params(&s).unwrap(), g.params(&far).unwrap());
        let v = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        for (x, y) in v(&p[0].0).iter().zip(v(&q[0].0)) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        // Uncentred, the same two embeddings give different parameters.
        g.centered = false;
        assert!(v(&g.params(&s).unwrap()[0].0)
            .iter()
            .zip(v(&g.params(&far).unwrap()[0].0))
            .any(|(x, y)| (x - y).abs() > 1e-2));
    }

    #[test]
    fn kl_surrogate_has_the_exact_gradient_and_gates_are_differentiable() {
        let a = Var::new(&[2.0f32, -1.0, 0.0, 3.0], &Device::Cpu).unwrap();
        let b = Var::new(&[0.5413f32, 0.5413, 0.0, 2.0], &Device::Cpu).unwrap();
        let (sur, value) = kl_term(a.as_tensor(), b.as_tensor(), ALPHA).unwrap();
        let want: f64 = [(2.0, 0.5413), (-1.0, 0.5413), (0.0, 0.0), (3.0, 2.0)]
            .iter()
            .map(|&(x, y)| {
                let (p, q) = ab(x, y);
                kl(p, q, ALPHA)
            })
            .sum();
        assert!((value - want).abs() < 1e-4);
        let g = sur.backward().unwrap();
        let ga: Vec<f32> = g.get(a.as_tensor()).unwrap().to_vec1().unwrap();
        let gb: Vec<f32> = g.get(b.as_tensor()).unwrap().to_vec1().unwrap();
        for (i, &(x, y)) in [(2.0, 0.5413), (-1.0, 0.5413), (0.0, 0.0), (3.0, 2.0)]
            .iter()
            .enumerate()
        {
            let (da, db) = kl_grad_uc(x, y, ALPHA);
            assert!((ga[i] as f64 - da).abs() < 1e-4 * (1.0 + da.abs()));
            assert!((gb[i] as f64 - db).abs() < 1e-4 * (1.0 + db.abs()));
        }
        // Relaxed-Bernoulli gates: [B, C] in (0, 1), gradient reaches the parameters.
        let z = sample_gates(a.as_tensor(), b.as_tensor(), 5, TEMPERATURE, &mut rng(0)).unwrap();
        assert_eq!(z.dims(), &[5, 4]);
        let zv: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
        assert!(zv.iter().all(|v| (0.0..=1.0).contains(v)));
        let gr = z.sum_all().unwrap().backward().unwrap();
        assert!(gr
            .get(a.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .any(|v| *v != 0.0));
        // The batch-mean gate tracks E[π] for a gate with mass away from 0/1.
        let a2 = Tensor::new(&[2.0f32; 1], &Device::Cpu).unwrap();
        let b2 = Tensor::new(&[0.5413f32; 1], &Device::Cpu).unwrap();
        let mut r = rng(1);
        let mean: f32 = (0..400)
            .map(|_| {
                sample_gates(&a2, &b2, 50, TEMPERATURE, &mut r)
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum::<f32>()
            / 400.0;
        assert!((mean - 0.6802).abs() < 0.03, "mean gate {mean}");
    }
}

mod meta {
    use lopper::data::{self, Split};
    use lopper::graph::cost::cost;
    use lopper::methods::stamp::meta::{sample_set, MetaConfig, Stamp};
    use lopper::train::{self, TrainConfig, TrainOpts};
    use lopper::zoo;

    fn small_config() -> MetaConfig {
        MetaConfig {
            iterations: 10,
            tasks: 2,
            n_way: 3,
            n_per_class: 5,
            inner_steps: 2,
            inner_batch: 32,
            outer_batch: 32,
            enc_dim: 16,
            heads: 2,
            ..Default::default()
        }
    }

    fn all_params(st: &Stamp) -> Vec<f32> {
        let enc = st.encoder_params().unwrap();
        enc.into_iter()
            .chain(st.generator.vars())
            .flat_map(|(_, p)| {
                p.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    /// Spec §7.14 (a fixed seed gives identical losses and masks for the first 10
    /// meta-iterations) and §7.10 (10× larger γ keeps no more channels: the mean gate
    /// `E[π]` after the same iterations is lower).
    #[test]
    fn meta_training_is_seeded_and_gamma_closes_gates() {
        let tr = data::load("digits", Split::Train, None).unwrap();
        let g = zoo::build("resnet8@1x8x8#10", 0).unwrap();
        let reference = tr.class_subset(&[0, 1, 2, 3, 4, 5]).unwrap();
        let target = tr.class_subset(&[6, 7, 8, 9]).unwrap();
        let set = sample_set(&target, 40, 1).unwrap();
        let run = |gamma: f64| {
            let mc = MetaConfig {
                gamma,
                ..small_config()
            };
            let st = Stamp::new(&g, &mc).unwrap();
            let log = st.meta_train(&g, &reference, &mc, |_| {}).unwrap();
            let (z, _) = st.target_gates(&g, &target, &set, Some(0.6)).unwrap();
            (log, all_params(&st), z)
        };
        let (l1, p1, z1) = run(1e-3);
        let (l2, p2, z2) = run(1e-3);
        assert_eq!(l1.len(), 10);
        for (a, b) in l1.iter().zip(&l2) {
            assert_eq!(a.outer_ce, b.outer_ce, "iteration {}", a.iteration);
            assert_eq!(a.kl, b.kl);
            assert_eq!(a.mean_gate, b.mean_gate);
        }
        assert_eq!(p1, p2);
        assert_eq!(z1, z2);
        // A different seed is a different run.
        let mc = MetaConfig {
            gamma: 1e-3,
            seed: 1,
            ..small_config()
        };
        let st = Stamp::new(&g, &mc).unwrap();
        let l3 = st.meta_train(&g, &reference, &mc, |_| {}).unwrap();
        assert_ne!(l1[9].outer_ce, l3[9].outer_ce);
        // γ monotonicity: 1e-3 → 1e-2 → 1e-1, the mean gate after 10 iterations falls.
        let (lg, _, _) = run(1e-2);
        let (lh, _, _) = run(1e-1);
        let m = |l: &[lopper::methods::stamp::meta::MetaLog]| l.last().unwrap().mean_gate;
        assert!(
            m(&l1) > m(&lg) && m(&lg) > m(&lh),
            "mean gates {} {} {}",
            m(&l1),
            m(&lg),
            m(&lh)
        );
    }

    #[test]
    fn meta_training_runs_and_target_pruning_meets_a_budget() {
        let tr = data::load("digits", Split::Train, None).unwrap();
        let g = zoo::build("resnet8@1x8x8#10", 0).unwrap();
        let cfg = TrainConfig {
            epochs: 3,
            batch_size: 64,
            lr: 0.05,
            ..Default::default()
        };
        train::train(&g, &tr, &cfg, &TrainOpts::default()).unwrap();
        let reference = tr.class_subset(&[0, 1, 2, 3, 4, 5]).unwrap();
        let target = tr.class_subset(&[6, 7, 8, 9]).unwrap();
        let mc = MetaConfig {
            iterations: 3,
            ..small_config()
        };
        let st = Stamp::new(&g, &mc).unwrap();
        let before: Vec<f32> = st.generator.c[0].as_tensor().to_vec1().unwrap();
        let log = st.meta_train(&g, &reference, &mc, |_| {}).unwrap();
        assert_eq!(log.len(), 3);
        assert!(log
            .iter()
            .all(|l| l.outer_ce.is_finite() && l.kl.is_finite()));
        let after: Vec<f32> = st.generator.c[0].as_tensor().to_vec1().unwrap();
        assert_ne!(before, after, "the generator was not updated");
        // Target-time pruning from a sample set of the unseen classes, under a MACs budget.
        let set = sample_set(&target, 40, 1).unwrap();
        let (z1, tau) = st.target_gates(&g, &target, &set, Some(0.7)).unwrap();
        assert!(tau >= 1e-3);
        let pruned = st.prune(&g, &target, &set, Some(0.7)).unwrap();
        assert!(
            cost(&pruned).unwrap().total_macs as f64 <= 0.7 * cost(&g).unwrap().total_macs as f64
        );
        // The set is a set: order does not matter.
        let mut rev = set.clone();
        rev.reverse();
        let (z2, _) = st.target_gates(&g, &target, &rev, Some(0.7)).unwrap();
        for (a, b) in z1.iter().flatten().zip(z2.iter().flatten()) {
            assert!((a - b).abs() < 1e-5);
        }
        // Bad input.
        assert!(sample_set(&target, target.len() + 1, 0).is_err());
        let bad = MetaConfig {
            n_way: 7,
            ..mc.clone()
        };
        assert!(st.meta_train(&g, &reference, &bad, |_| {}).is_err());
        for bad in [
            MetaConfig {
                kl_warmup: 1.5,
                ..mc.clone()
            },
            MetaConfig {
                gamma: f64::NAN,
                ..mc.clone()
            },
        ] {
            let e = st.meta_train(&g, &reference, &bad, |_| {}).unwrap_err();
            assert!(format!("{e}").contains("warm-up"), "{e}");
        }
        assert!(st.target_gates(&g, &target, &set, Some(1.5)).is_err());
    }
}

/// Spec §7.11–7.12 on the planted-channel toy (a short run of examples/stamp_toy.rs): the
/// meta-trained generator keeps an unseen dataset's informative channels and, pruned to
/// the same MACs, beats the generator meta-trained with a constant embedding (which can
/// only learn one dataset-agnostic mask). The spec's drop rate at τ = 1e-3 (> 0.7) and
/// Jaccard < 0.5 are not reached in this budget (BENCHMARKS §10) and not asserted.
#[test]
fn planted_toy_masks_follow_the_dataset() {
    use lopper::methods::stamp::meta::{MetaConfig, Stamp};
    use lopper::methods::stamp::toy::{config, evaluate, planted_data, planted_net, PATTERNS};
    let g = planted_net().unwrap();
    let reference = planted_data(&(0..PATTERNS).collect::<Vec<_>>(), 60, 1).unwrap();
    assert!(
        lopper::sparse::eval::accuracy(&g, &reference, &Default::default(), 0, 256).unwrap() > 0.99,
        "the hand-built net must solve its task"
    );
    let cfg = config(300, 0.01, 3);
    let st = Stamp::new(&g, &cfg).unwrap();
    st.meta_train(&g, &reference, &cfg, |_| {}).unwrap();
    let flat_cfg = MetaConfig {
        constant_embedding: true,
        ..cfg.clone()
    };
    let flat = Stamp::new(&g, &flat_cfg).unwrap();
    flat.meta_train(&g, &reference, &flat_cfg, |_| {}).unwrap();
    let r = evaluate(&g, &st, &flat, 6, 0.3).unwrap();
    eprintln!("{r:?}");
    assert!(r.p_keep > 0.9, "{r:?}");
    assert!(r.acc_stamp > r.acc_flat + 0.3, "{r:?}");
}
