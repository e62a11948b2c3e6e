//! DWR (spec `dwr.md` §10): predictor fit, constrained optimum, 3D vs 1D, limits, LOO
//! degree choice, monotonicity guard, exact-vs-approximate MACs ratios.

use lopper::graph::cost::cost;
use lopper::methods::dwr::linalg::{rank, Mat};
use lopper::methods::dwr::{fit, fit_auto, maximise, Point};
use lopper::prune::{remove_blocks, residual_blocks, with_resolution};
use lopper::zoo;

fn truth(d: f64, w: f64, r: f64) -> f64 {
    0.95 * (1.0 - 0.3 * (1.0 - d).powi(2))
        * (1.0 - 0.5 * (1.0 - w).powi(2))
        * (1.0 - 0.8 * (1.0 - r).powi(2))
}

/// The 22 axis points of T1: d, w, r ∈ {1.0, 0.9, …, 0.3}, (1,1,1) shared.
fn axis_points(f: &dyn Fn(f64, f64, f64) -> f64) -> Vec<Point> {
    let grid: Vec<f64> = (0..8).map(|i| 1.0 - 0.1 * i as f64).collect();
    let mut p = vec![];
    for &v in &grid {
        p.push(Point {
            d: v,
            w: 1.0,
            r: 1.0,
            acc: f(v, 1.0, 1.0),
        });
    }
    for &v in &grid[1..] {
        p.push(Point {
            d: 1.0,
            w: v,
            r: 1.0,
            acc: f(1.0, v, 1.0),
        });
    }
    for &v in &grid[1..] {
        p.push(Point {
            d: 1.0,
            w: 1.0,
            r: v,
            acc: f(1.0, 1.0, v),
        });
    }
    p
}

#[test]
fn t1_rank1_fit_recovers_the_separable_surface() {
    let pts = axis_points(&truth);
    assert_eq!(pts.len(), 22);
    let m = fit(&pts, 1, 2, 0.0).unwrap();
    assert!(m.rmse < 1e-9, "rmse {}", m.rmse);
    assert!((m.eval(0.7, 0.8, 0.9) - 0.898616).abs() < 1e-6);
    // Full tensor K = 2 on axis-only data: rank 7 of 27 (cross terms unidentifiable).
    let rows: Vec<Vec<f64>> = pts
        .iter()
        .map(|p| {
            let mut row = vec![];
            for i in 0..3 {
                for j in 0..3 {
                    for k in 0..3 {
                        row.push(p.d.powi(i) * p.w.powi(j) * p.r.powi(k));
                    }
                }
            }
            row
        })
        .collect();
    assert_eq!(rank(&Mat::from_rows(&rows)), 7);
}

#[test]
fn t2_t3_constrained_optimum_and_3d_beats_1d() {
    let m = fit(&axis_points(&truth), 1, 2, 0.0).unwrap();
    let lo = [0.05; 3];
    for (t, want, f_want, mu, one_d) in [
        (
            0.5,
            [0.8686, 0.8378, 0.9056],
            0.92600,
            0.068857,
            [0.87875, 0.90925, 0.88480],
        ),
        (
            0.3,
            [0.7838, 0.7268, 0.8512],
            0.88575,
            0.103130,
            [0.81035, 0.85284, 0.79454],
        ),
    ] {
        let o = maximise(&m, t, lo).unwrap();
        for (got, w) in [o.d, o.w, o.r].iter().zip(want) {
            assert!((got - w).abs() < 2e-3, "T={t}: {o:?}");
        }
        assert!((o.f - f_want).abs() < 1e-5, "T={t}: {o:?}");
        assert!((o.d * o.w * o.w * o.r * o.r - t).abs() < 1e-9);
        assert!(o.interior);
        assert!(
            (o.elasticity.0 - 2.0).abs() < 2e-3 && (o.elasticity.1 - 2.0).abs() < 2e-3,
            "{o:?}"
        );
        assert!((o.mu - mu).abs() < 1e-4, "{o:?}");
        // Single-dimension solutions are all worse.
        let s = t.sqrt();
        let singles = [
            m.eval(t, 1.0, 1.0),
            m.eval(1.0, s, 1.0),
            m.eval(1.0, 1.0, s),
        ];
        for (a, b) in singles.iter().zip(one_d) {
            assert!((a - b).abs() < 1e-5 && *a < o.f);
        }
    }
}

#[test]
fn t4_limits() {
    let m = fit(&axis_points(&truth), 1, 2, 0.0).unwrap();
    let lo = [0.3; 3];
    let o = maximise(&m, 1.0, lo).unwrap();
    assert!(o.d > 0.999 && o.w > 0.999 && o.r > 0.999);
    let mut prev = f64::INFINITY;
    for t in [0.9, 0.7, 0.5, 0.3, 0.1, 0.05] {
        let o = maximise(&m, t, lo).unwrap();
        assert!(o.f <= prev + 1e-9);
        prev = o.f;
    }
    // A surface independent of r spends the whole budget on r: d and w sit on their upper
    // bounds (active box constraints), not at an interior point.
    let flat = fit(&axis_points(&|d, w, _| truth(d, w, 1.0)), 1, 2, 0.0).unwrap();
    let o = maximise(&flat, 0.3, lo).unwrap();
    assert!(
        o.d > 0.999 && o.w > 0.999 && (o.r - 0.3f64.sqrt()).abs() < 1e-3,
        "{o:?}"
    );
    assert!(!o.interior);
    // ... and with a budget below what r alone can absorb, r sits on its lower bound.
    let o = maximise(&flat, 0.05, lo).unwrap();
    assert!((o.r - 0.3).abs() < 1e-6 && !o.interior, "{o:?}");
    // Below the box floor: an error naming the limit.
    let e = maximise(&m, 0.001, lo).unwrap_err().to_string();
    assert!(
        e.contains("below what any configuration") && e.contains("0.0024"),
        "{e}"
    );
}

#[test]
fn t9_t10_degree_choice_and_monotonicity_guard() {
    let (m, loo) = fit_auto(&axis_points(&truth), [0.3; 3]).unwrap();
    assert_eq!(m.degree, 2, "{loo:?}");
    // 1 % noise: never a degree above (points per axis − 2).
    let noisy = axis_points(&|d, w, r| {
        let h = ((d * 1e3 + w * 1e5 + r * 1e7) as u64).wrapping_mul(6364136223846793005);
        truth(d, w, r) * (1.0 + 0.02 * (((h >> 33) as f64 / (1u64 << 31) as f64) - 0.5))
    });
    let (m, _) = fit_auto(&noisy[..], [0.3; 3]).unwrap();
    assert!(m.degree <= 3);
    // Few points per axis restrict the degree; too few is an error.
    let few: Vec<Point> = axis_points(&truth)
        .into_iter()
        .filter(|p| [p.d, p.w, p.r].iter().all(|&x| x > 0.75))
        .collect();
    let (m, loo) = fit_auto(&few, [0.3; 3]).unwrap();
    assert!(m.degree <= 1 && loo.len() == 1, "{loo:?}");
    let two: Vec<Point> = few
        .into_iter()
        .filter(|p| [p.d, p.w, p.r].iter().all(|&x| x > 0.85))
        .collect();
    // Two values on an axis (dense + one pruned point): a line along it, still an answer.
    let (m, loo) = fit_auto(&two, [0.3; 3]).unwrap();
    assert!(
        m.degrees == [1; 3] && loo.len() == 1,
        "{:?} {loo:?}",
        m.degrees
    );
    // Mixed: depth measured at two values only, width and resolution at many — depth is
    // linear, the others keep the degree their points support.
    let mixed: Vec<Point> = axis_points(&truth)
        .into_iter()
        .filter(|p| p.d > 0.85)
        .collect();
    let (m, _) = fit_auto(&mixed, [0.3; 3]).unwrap();
    assert_eq!(m.degrees[0], 1);
    assert_eq!(m.degrees[1], 2, "{:?}", m.degrees);
    // Only the dense point on an axis: an error naming the axis.
    let one: Vec<Point> = axis_points(&truth)
        .into_iter()
        .filter(|p| p.r > 0.95)
        .collect();
    let e = fit_auto(&one, [0.3; 3]).unwrap_err().to_string();
    assert!(e.contains("at least 2") && e.contains("resolution"), "{e}");
    // The guard: a cubic that turns down inside the box is flagged.
    let bumpy = axis_points(&|d, w, r| truth(d, w, r) + 0.3 * (0.6 - w).max(0.0).powi(2));
    let m3 = fit(&bumpy, 1, 3, 1e-8).unwrap();
    assert!(m3.min_slope([0.3; 3], 12) < -1e-6);
    let (guarded, _) = fit_auto(&bumpy, [0.3; 3]).unwrap();
    assert!(guarded.degree < 3 || guarded.min_slope([0.3; 3], 50) >= -1e-6);
}

#[test]
fn t5_exact_versus_approximate_macs_ratios() {
    let full = zoo::build("resnet56", 0).unwrap();
    let base = cost(&full).unwrap().total_macs as f64;
    assert_eq!(base as u64, 125_485_696);
    // Resolution: exactly r² when sizes divide the strides.
    let r24 = with_resolution(&full, 24, 24).unwrap();
    let ratio = cost(&r24).unwrap().total_macs as f64 / base;
    assert!((ratio - 0.5625).abs() < 2e-4, "{ratio}");
    // Depth: 5 of 9 blocks per stage (4 removable blocks removed per stage) ≈ 0.5488.
    let blocks = residual_blocks(&full).unwrap();
    let mut drop = vec![];
    for stage in ["layer1", "layer2", "layer3"] {
        let ids: Vec<_> = blocks
            .iter()
            .filter(|b| b.removable && full.nodes[b.branch[0]].name.starts_with(stage))
            .map(|b| b.add)
            .collect();
        drop.extend(ids.into_iter().rev().take(4));
    }
    let d = remove_blocks(&full, &drop).unwrap();
    let ratio = cost(&d).unwrap().total_macs as f64 / base;
    assert!((ratio - 0.5488).abs() < 1e-3, "{ratio}");
}

#[test]
fn t6_snapped_configuration_is_feasible_and_locally_best() {
    use lopper::methods::dwr::{build, depth_order, snap, Config};
    let g = zoo::build("resnet20@3x16x16", 0).unwrap();
    let data = {
        let n = 64;
        let px: Vec<u8> = (0..n * 3 * 16 * 16).map(|i| (i * 7 % 251) as u8).collect();
        lopper::data::Dataset::new(
            "synthetic",
            px,
            (0..n).map(|i| (i % 10) as u16).collect(),
            [3, 16, 16],
            255.0,
            vec![0.5; 3],
            vec![0.25; 3],
            (0..10).map(|i| i.to_string()).collect(),
        )
        .unwrap()
    };
    let order = depth_order(&g, &data, 64).unwrap();
    assert_eq!(order.total_blocks, 9);
    assert_eq!(order.adds.len(), 7);
    let m = fit(&axis_points(&truth), 1, 2, 0.0).unwrap();
    let lo = [0.3; 3];
    let dense = cost(&g).unwrap().total_macs as f64;
    for t in [0.5, 0.3] {
        let (c, macs, f) = snap(&g, &order, &m, t, lo, 2, [true; 3]).unwrap();
        let built = build(&g, &order, c).unwrap();
        assert_eq!(cost(&built).unwrap().total_macs, macs);
        assert!(macs as f64 <= t * dense);
        let score = |c: Config| -> Option<f64> {
            let b = build(&g, &order, c).ok()?;
            let d = (9 - c.blocks_removed) as f64 / 9.0;
            let ok = cost(&b).unwrap().total_macs as f64 <= t * dense
                && d >= 0.3
                && c.width >= 0.3
                && c.width <= 1.0
                && c.px <= 16
                && c.px as f64 >= 0.3 * 16.0;
            let gd = lopper::methods::dwr::ops::prune_depth(&g, &order, c.blocks_removed).ok()?;
            let w = lopper::methods::dwr::ops::prunable_channels(&b).unwrap() as f64
                / lopper::methods::dwr::ops::prunable_channels(&gd).unwrap() as f64;
            ok.then(|| m.eval(d, w, c.px as f64 / 16.0))
        };
        for dn in [-1i64, 0, 1] {
            for dk in [-1i64, 0, 1] {
                for dp in [-2i64, 0, 2] {
                    let n = c.blocks_removed as i64 + dn;
                    if n < 0 || n as usize > order.adds.len() {
                        continue;
                    }
                    let nb = Config {
                        blocks_removed: n as usize,
                        width: c.width + dk as f64 / 64.0,
                        px: (c.px as i64 + dp) as usize,
                    };
                    if let Some(fv) = score(nb) {
                        assert!(
                            fv <= f + 1e-9,
                            "T={t}: neighbour {nb:?} {fv} beats {c:?} {f}"
                        );
                    }
                }
            }
        }
    }
}
