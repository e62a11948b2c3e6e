//! UniPTS pieces with the spec's golden values (`reference/unipts_toy_output.txt`):
//! reducing–regrowing decoding and the base-decayed distillation loss and gradient.

use candle_core::{Device, Tensor, Var};
use lopper::methods::unipts::{base_decayed_kd, kept_counts, layer_sparsity, tau_at};

fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// (genome, sparsity per layer, kept per layer, global sparsity)
type DecodeCase<'a> = (&'a [f64], [f64; 3], [usize; 3], f64);

#[test]
fn decoding_matches_the_reference() {
    let sizes = [100, 1000, 10000];
    let cases: [DecodeCase; 3] = [
        (
            &[0.0, 0.0, 0.0],
            [0.0, 0.765, 0.9315],
            [100, 235, 685],
            0.908108,
        ),
        (
            &[0.9, 0.9, 0.9],
            [0.0, 0.765, 0.9315],
            [100, 235, 685],
            0.908108,
        ),
        (
            &[1.0, 0.0, 2.0],
            [0.0, 0.900033, 0.913079],
            [100, 100, 870],
            0.903604,
        ),
    ];
    for (g, s_want, k_want, global) in cases {
        let s = layer_sparsity(g, &sizes, 0.9, 0.05).unwrap();
        let s6: Vec<f64> = s.iter().map(|&v| round6(v)).collect();
        assert_eq!(s6, s_want.to_vec(), "{g:?}");
        let k = kept_counts(&s, &sizes);
        assert_eq!(k, k_want.to_vec());
        let g_sp = 1.0 - k.iter().sum::<usize>() as f64 / sizes.iter().sum::<usize>() as f64;
        assert_eq!(round6(g_sp), global);
        // Before clipping the budget is exact; clipping only raises the global sparsity.
        assert!(g_sp >= 0.9 - 1e-9);
    }
    assert!(layer_sparsity(&[0.0], &[10, 20], 0.9, 0.05).is_err());
    assert!(layer_sparsity(&[0.0, f64::NAN], &[10, 20], 0.9, 0.05).is_err());
    assert!(layer_sparsity(&[0.0, 0.0], &[10, 20], 0.97, 0.05).is_err());
}

fn kd(ys: &[f32], yt: &[f32], epoch: usize) -> (f64, f64, Vec<f64>) {
    let tau = tau_at(epoch, 8.0, 0.99);
    let v =
        Var::from_tensor(&Tensor::new(ys, &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
    let t = Tensor::new(yt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let l = base_decayed_kd(v.as_tensor(), &t, 4.0, tau).unwrap();
    let g = l.backward().unwrap();
    let gv: Vec<f32> = g
        .get(v.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let lv = l.to_scalar::<f32>().unwrap() as f64;
    (tau, lv, gv.into_iter().map(|x| x as f64).collect())
}

#[test]
fn base_decayed_loss_and_gradient_match_the_reference() {
    let want = [
        (0, 8.0, -15.05237, [-0.171791, 0.013675, 0.158116]),
        (50, 4.840049, -13.617855, [-0.28395, 0.022603, 0.261347]),
        (99, 2.957837, -11.306807, [-0.46464, 0.036986, 0.427654]),
    ];
    for (ep, tau, loss, grad) in want {
        let (t, l, g) = kd(&[0.0, 0.0, 0.0], &[2.0, 1.0, 0.0], ep);
        assert!((t - tau).abs() < 1e-6, "epoch {ep}: tau {t}");
        assert!((l - loss).abs() < 1e-4, "epoch {ep}: loss {l}");
        for (a, b) in g.iter().zip(grad) {
            assert!((a - b).abs() < 1e-5, "epoch {ep}: grad {g:?}");
        }
    }
    // The analytic gradient of the reference's finite-difference check.
    let (_, _, g) = kd(&[0.3, -0.2, 0.5], &[2.0, 1.0, 0.0], 0);
    for (a, b) in g.iter().zip([-0.131228, -0.224035, 0.355263]) {
        assert!((a - b).abs() < 1e-5, "{g:?}");
    }
}

mod ga {
    use lopper::methods::unipts::search::{crossover, mutate, search, GaConfig};
    use rand::SeedableRng;
    use rand_pcg::Pcg64;

    /// A fitness that prefers genomes close to a fixed point, recording every call.
    fn run(cfg: &GaConfig, layers: usize) -> (lopper::methods::unipts::SearchResult, usize) {
        let mut calls = 0;
        let r = search(layers, 0.9, cfg, |g| {
            calls += 1;
            Ok(-g
                .iter()
                .enumerate()
                .map(|(i, v)| (v - i as f64 * 0.1).powi(2))
                .sum::<f64>())
        })
        .unwrap();
        (r, calls)
    }

    #[test]
    fn reference_bookkeeping() {
        let cfg = GaConfig::reference(7);
        let (r, calls) = run(&cfg, 6);
        assert_eq!(calls, 625);
        assert_eq!(r.evaluations, 625);
        assert_eq!(cfg.evaluations(), 625);
        let sizes: Vec<usize> = r.generations.iter().map(|g| g.size).collect();
        assert_eq!(sizes[0], 25);
        assert!(sizes[1..].iter().all(|&s| s == 24));
        // [P]·L is the first crossover child of every generation after the first.
        for p in &r.populations[1..] {
            assert_eq!(p[0], vec![0.9; 6]);
            assert_eq!(p.len(), 24);
        }
        // Search improves on the uniform genome under this fitness.
        assert!(r.generations.last().unwrap().best >= r.generations[0].best);
        // Seeded: the same genomes again.
        let (r2, _) = run(&cfg, 6);
        assert_eq!(r.populations, r2.populations);
        assert_eq!(r.genome, r2.genome);
        let (r3, _) = run(&GaConfig::reference(8), 6);
        assert_ne!(r.populations[1], r3.populations[1]);
    }

    #[test]
    fn operators() {
        let mut rng = Pcg64::seed_from_u64(1);
        let a: Vec<f64> = (0..50).map(|i| i as f64).collect();
        let b: Vec<f64> = (0..50).map(|i| -(i as f64) - 1.0).collect();
        let c = crossover(&a, &b, &mut rng);
        assert!(c.iter().enumerate().all(|(i, v)| *v == a[i] || *v == b[i]));
        assert!(c.iter().zip(&a).any(|(x, y)| x == y) && c.iter().zip(&b).any(|(x, y)| x == y));
        assert_eq!(mutate(&b, 0.0, &mut rng), b);
        let m = mutate(&b, 1.0, &mut rng);
        assert!(m.iter().zip(&b).all(|(x, y)| x != y));
        // A zero gene stays (its product is exactly 0).
        assert_eq!(mutate(&[0.0, 0.0], 1.0, &mut rng), vec![0.0, 0.0]);
    }

    #[test]
    fn bad_configs_are_rejected() {
        let mut c = GaConfig::proxy(0);
        c.parents = 20;
        assert!(run_err(&c));
        let mut c = GaConfig::proxy(0);
        c.p_mut = 1.5;
        assert!(run_err(&c));
    }

    fn run_err(cfg: &GaConfig) -> bool {
        search(3, 0.5, cfg, |_| Ok(0.0)).is_err()
    }
}

#[test]
fn lr_schedule_matches_the_reference() {
    use lopper::methods::unipts::schedule::lr_at;
    let (i, lr0) = (160, 0.01);
    assert_eq!(lr_at(0, i, 100, lr0), 0.0);
    let want = lr0 * 0.5 * (1.0 + (std::f64::consts::PI / 100.0).cos());
    assert!((lr_at(i, i, 100, lr0) - want).abs() < 1e-15);
    assert!(lr_at(100 * i, i, 100, lr0).abs() < 1e-15);
    assert!((lr_at(80, i, 100, lr0) - lr0 / 2.0).abs() < 1e-15);
}

mod end_to_end {
    use lopper::data::{self, Augment, Dataset, Split};
    use lopper::graph::{io, Graph};
    use lopper::methods::pts;
    use lopper::methods::unipts::fitness::Fitness;
    use lopper::methods::unipts::{self, kept_counts, DstConfig, GaConfig, UniptsConfig};
    use lopper::sparse::bn::{recalibrate_bn, RecalibOpts};
    use lopper::sparse::eval::accuracy;
    use lopper::sparse::layers::{prunable_layers, sparsity_report, weight_host};
    use lopper::sparse::mask::Pattern;
    use lopper::train::{self, evaluate, TrainConfig, TrainOpts};
    use lopper::zoo;
    use std::sync::OnceLock;

    /// A ResNet-8 trained on the embedded digits (shared by the tests of this module).
    fn dense() -> &'static (Graph, Dataset, Dataset) {
        static D: OnceLock<(Graph, Dataset, Dataset)> = OnceLock::new();
        D.get_or_init(|| {
            let tr = data::load("digits", Split::Train, None).unwrap();
            let te = data::load("digits", Split::Test, None).unwrap();
            let g = zoo::build("resnet8@1x8x8#10", 0).unwrap();
            let cfg = TrainConfig {
                epochs: 6,
                batch_size: 64,
                lr: 0.05,
                ..Default::default()
            };
            train::train(&g, &tr, &cfg, &TrainOpts::default()).unwrap();
            (g, tr, te)
        })
    }

    #[test]
    fn fitness_of_the_dense_genome_is_the_recalibrated_accuracy() {
        let (g, tr, _) = dense();
        let calib = tr.sample(256, 1).unwrap();
        let layers = prunable_layers(g);
        let f = Fitness::new(g, &layers, &calib, 0.9, 0.05, 1e-6, Augment::default(), 64).unwrap();
        let zero = vec![0.0; layers.len()];
        let a = f.eval_sparsity(&zero, 3).unwrap();
        let b = f.eval_sparsity(&zero, 3).unwrap();
        assert_eq!(a, b, "deterministic given the seed");
        // By hand: dense copy, BN re-estimated on the same data, accuracy on it.
        let h = g.deep_clone().unwrap();
        recalibrate_bn(
            &h,
            &calib,
            &RecalibOpts {
                noise: 1e-6,
                seed: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let want = accuracy(&h, &calib, &Augment::default(), 0, 256).unwrap();
        assert_eq!(a, want);
        // Close to, not necessarily equal to, the accuracy with the trained statistics.
        let orig = accuracy(g, &calib, &Augment::default(), 0, 256).unwrap();
        assert!((a - orig).abs() < 0.05, "{a} vs {orig}");
        // The dense model is untouched by fitness evaluations.
        assert_eq!(
            accuracy(g, &calib, &Augment::default(), 0, 256).unwrap(),
            orig
        );
        // Higher sparsity, lower fitness.
        let s = f.eval(&vec![0.9; layers.len()], 3).unwrap();
        assert!(s < a);
    }

    #[test]
    fn unipts_end_to_end_sparsity_and_export() {
        let (g, tr, te) = dense();
        let calib = tr.sample(384, 2).unwrap();
        let mut dst = DstConfig::with_epochs(3);
        dst.lr = 0.02;
        let cfg = UniptsConfig {
            target: 0.8,
            extra: 0.05,
            ga: Some(GaConfig {
                population: 4,
                generations: 2,
                parents: 2,
                crossover: 1,
                mutation: 1,
                p_mut: 0.1,
                seed: 0,
            }),
            search_samples: 384,
            noise: 1e-6,
            pattern: Pattern::Unstructured,
            dst,
            genome: None,
        };
        let (sp, res) = unipts::run(g, &calib, &cfg, None, &lopper::util::Silent).unwrap();
        assert_eq!(res.search.as_ref().unwrap().evaluations, 4 + 2 + 2);
        let layers = prunable_layers(&sp);
        let sizes: Vec<usize> = layers.iter().map(|l| l.numel()).collect();
        let kept = kept_counts(&res.layer_sparsity, &sizes);
        for (l, k) in layers.iter().zip(&kept) {
            let nz = weight_host(&sp, l)
                .unwrap()
                .iter()
                .filter(|v| **v != 0.0)
                .count();
            assert!(nz <= *k, "{}: {nz} non-zeros > {k}", l.name);
        }
        let (_, global) = sparsity_report(&sp).unwrap();
        let predicted =
            1.0 - kept.iter().sum::<usize>() as f64 / sizes.iter().sum::<usize>() as f64;
        assert!((global - predicted).abs() < 1e-3, "{global} vs {predicted}");
        assert!(global >= 0.8 - 1e-9);
        // The saved model holds m ⊙ w.
        let dir = std::env::temp_dir().join(format!("lopper-unipts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("sparse.safetensors");
        io::save(&sp, &p).unwrap();
        let back = io::load(&p).unwrap();
        assert_eq!(sparsity_report(&back).unwrap().1, global);
        let a = evaluate(&sp, te, 500).unwrap().top1;
        assert_eq!(evaluate(&back, te, 500).unwrap().top1, a);
        std::fs::remove_dir_all(&dir).ok();
        // Sparse training beats one-shot magnitude + BN recalibration at this sparsity.
        let base = g.deep_clone().unwrap();
        pts::uniform_magnitude(&base, &prunable_layers(&base), 0.8, Pattern::Unstructured).unwrap();
        recalibrate_bn(&base, &calib, &RecalibOpts::default()).unwrap();
        let b = evaluate(&base, te, 500).unwrap().top1;
        assert!(a > b, "UniPTS {a} vs magnitude {b}");
    }

    #[test]
    fn nm_sparse_training_keeps_the_pattern() {
        let (g, tr, _) = dense();
        let calib = tr.sample(128, 3).unwrap();
        let cfg = UniptsConfig {
            target: 0.5,
            extra: 0.05,
            ga: None,
            search_samples: 128,
            noise: 1e-6,
            pattern: Pattern::NM { n: 2, m: 4 },
            dst: DstConfig::with_epochs(1),
            genome: None,
        };
        let (sp, _) = unipts::run(g, &calib, &cfg, None, &lopper::util::Silent).unwrap();
        for l in prunable_layers(&sp) {
            let w = weight_host(&sp, &l).unwrap();
            for row in w.chunks(l.row_len) {
                for grp in row.chunks(4) {
                    let nz = grp.iter().filter(|v| **v != 0.0).count();
                    assert!(nz <= (2 * grp.len()).div_ceil(4), "{}: {grp:?}", l.name);
                }
            }
        }
    }
}
