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
