//! The Model Accuracy Predictor (spec §2): `F(d,w,r) = Σ_s P_s(d)·Q_s(w)·S_s(r)`, a CP
//! low-rank form of the paper's polynomial `Σ λ_ijk dⁱ wʲ rᵏ`, fitted by alternating least
//! squares with ridge; degree chosen by leave-one-out; a monotonicity guard on the box.

use super::linalg::{lstsq, Mat};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// One collected point: normalised depth, width, resolution and the measured accuracy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub d: f64,
    pub w: f64,
    pub r: f64,
    pub acc: f64,
}

/// Polynomial `Σ c_i xⁱ`.
fn horner(c: &[f64], x: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &ci| acc * x + ci)
}

fn deriv(c: &[f64], x: f64) -> f64 {
    c.iter()
        .enumerate()
        .skip(1)
        .rev()
        .fold(0.0, |acc, (i, &ci)| acc * x + i as f64 * ci)
}

fn vand(x: f64, k: usize) -> Vec<f64> {
    (0..=k).map(|i| x.powi(i as i32)).collect()
}

/// A fitted predictor: per rank term, coefficient vectors of `P_s`, `Q_s`, `S_s`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Map {
    /// The largest of the per-axis degrees.
    pub degree: usize,
    /// Polynomial degree along depth, width and resolution. An axis with only two measured
    /// values gets a line (degree 1) while the others may be curved.
    pub degrees: [usize; 3],
    pub p: Vec<Vec<f64>>,
    pub q: Vec<Vec<f64>>,
    pub s: Vec<Vec<f64>>,
    /// Root-mean-square error on the fitted points.
    pub rmse: f64,
}

impl Map {
    pub fn eval(&self, d: f64, w: f64, r: f64) -> f64 {
        (0..self.p.len())
            .map(|s| horner(&self.p[s], d) * horner(&self.q[s], w) * horner(&self.s[s], r))
            .sum()
    }

    /// `(∂F/∂d, ∂F/∂w, ∂F/∂r)`.
    pub fn grad(&self, d: f64, w: f64, r: f64) -> [f64; 3] {
        let mut g = [0.0; 3];
        for s in 0..self.p.len() {
            let (pd, qw, sr) = (
                horner(&self.p[s], d),
                horner(&self.q[s], w),
                horner(&self.s[s], r),
            );
            g[0] += deriv(&self.p[s], d) * qw * sr;
            g[1] += pd * deriv(&self.q[s], w) * sr;
            g[2] += pd * qw * deriv(&self.s[s], r);
        }
        g
    }

    /// The smallest partial derivative over an `n³` grid of `[lo, 1]³` (the guard of §2.2:
    /// accuracy should not fall when a dimension grows).
    pub fn min_slope(&self, lo: [f64; 3], n: usize) -> f64 {
        let at = |k: usize, i: usize| lo[k] + (1.0 - lo[k]) * i as f64 / (n - 1).max(1) as f64;
        let mut m = f64::INFINITY;
        for i in 0..n {
            for j in 0..n {
                for k in 0..n {
                    let g = self.grad(at(0, i), at(1, j), at(2, k));
                    m = m.min(g[0]).min(g[1]).min(g[2]);
                }
            }
        }
        m
    }
}

/// Rank-`rank`, degree-`degree` ALS fit with ridge (spec §2.3).
pub fn fit(points: &[Point], rank: usize, degree: usize, ridge: f64) -> Result<Map> {
    fit_degrees(points, rank, [degree; 3], ridge)
}

/// [`fit`] with its own polynomial degree per axis (depth, width, resolution).
pub fn fit_degrees(points: &[Point], rank: usize, degrees: [usize; 3], ridge: f64) -> Result<Map> {
    if points.is_empty() || rank == 0 {
        bail!("the accuracy predictor needs points and a rank ≥ 1");
    }
    let y: Vec<f64> = points.iter().map(|p| p.acc).collect();
    let mean = y.iter().sum::<f64>() / y.len() as f64;
    let c0 = mean.abs().cbrt().max(1e-3);
    // Deterministic small perturbation breaks the symmetry between rank terms.
    let init = |s: usize, t: usize| -> Vec<f64> {
        (0..=degrees[t])
            .map(|i| {
                let base = if i == 0 { c0 } else { 0.0 };
                base + 1e-3 * (((s * 7 + t * 3 + i) as f64 * 1.618).sin())
            })
            .collect()
    };
    let mut f = [
        (0..rank).map(|s| init(s, 0)).collect::<Vec<_>>(),
        (0..rank).map(|s| init(s, 1)).collect::<Vec<_>>(),
        (0..rank).map(|s| init(s, 2)).collect::<Vec<_>>(),
    ];
    let coord = |p: &Point, a: usize| [p.d, p.w, p.r][a];
    for _ in 0..500 {
        let mut change = 0f64;
        for a in 0..3 {
            let k = degrees[a];
            let (o1, o2) = ((a + 1) % 3, (a + 2) % 3);
            let rows: Vec<Vec<f64>> = points
                .iter()
                .map(|p| {
                    let mut row = Vec::with_capacity(rank * (k + 1));
                    for (c1, c2) in f[o1].iter().zip(&f[o2]) {
                        let other = horner(c1, coord(p, o1)) * horner(c2, coord(p, o2));
                        row.extend(vand(coord(p, a), k).iter().map(|v| v * other));
                    }
                    row
                })
                .collect();
            let x = lstsq(&Mat::from_rows(&rows), &y, ridge);
            for s in 0..rank {
                let new = &x[s * (k + 1)..(s + 1) * (k + 1)];
                for (o, n) in f[a][s].iter().zip(new) {
                    change = change.max((o - n).abs() / n.abs().max(1e-12));
                }
                f[a][s] = new.to_vec();
            }
        }
        // Fix the scale ambiguity: unit-norm Q and S, scale moved into P.
        let [fp, fq, fs] = &mut f;
        for (p, (q, s)) in fp.iter_mut().zip(fq.iter_mut().zip(fs.iter_mut())) {
            for c in [q, s] {
                let n = c.iter().map(|v| v * v).sum::<f64>().sqrt();
                if n > 0.0 {
                    c.iter_mut().for_each(|v| *v /= n);
                    p.iter_mut().for_each(|v| *v *= n);
                }
            }
        }
        if change < 1e-12 {
            break;
        }
    }
    let [p, q, s] = f;
    let mut m = Map {
        degree: degrees.into_iter().max().unwrap_or(0),
        degrees,
        p,
        q,
        s,
        rmse: 0.0,
    };
    let se: f64 = points
        .iter()
        .map(|pt| (m.eval(pt.d, pt.w, pt.r) - pt.acc).powi(2))
        .sum();
    m.rmse = (se / points.len() as f64).sqrt();
    if !m.rmse.is_finite() {
        bail!("the accuracy predictor fit diverged (non-finite error)");
    }
    Ok(m)
}

/// Leave-one-out RMSE of a rank-1 fit of the given degree.
pub fn loo_rmse(points: &[Point], degree: usize, ridge: f64) -> Result<f64> {
    loo_rmse_degrees(points, [degree; 3], ridge)
}

/// [`loo_rmse`] with a degree per axis.
pub fn loo_rmse_degrees(points: &[Point], degrees: [usize; 3], ridge: f64) -> Result<f64> {
    let mut se = 0.0;
    for i in 0..points.len() {
        let rest: Vec<Point> = points
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, p)| *p)
            .collect();
        let m = fit_degrees(&rest, 1, degrees, ridge)?;
        let p = points[i];
        se += (m.eval(p.d, p.w, p.r) - p.acc).powi(2);
    }
    Ok((se / points.len() as f64).sqrt())
}

/// Distinct values along one axis among points that lie on that axis (others at 1).
fn axis_count(points: &[Point], a: usize) -> usize {
    let mut v: Vec<f64> = points
        .iter()
        .filter(|p| {
            let c = [p.d, p.w, p.r];
            (0..3)
                .filter(|&b| b != a)
                .all(|b| (c[b] - 1.0).abs() < 1e-12)
        })
        .map(|p| [p.d, p.w, p.r][a])
        .collect();
    v.sort_by(f64::total_cmp);
    v.dedup_by(|x, y| (*x - *y).abs() < 1e-12);
    v.len()
}

/// The degree in 1..=3 with the smallest leave-one-out error, then the fit, lowered while
/// the monotonicity guard fails. Each axis is capped so that it keeps at least two residual
/// degrees of freedom (`K_a ≤ points on the axis − 2`), but never below a line: an axis
/// measured at only two values (a network with one block per stage, images too small for
/// more than one resolution step) is fitted linearly while the others may curve. Returns
/// the map and the LOO errors.
pub fn fit_auto(points: &[Point], lo: [f64; 3]) -> Result<(Map, Vec<(usize, f64)>)> {
    let counts: [usize; 3] = std::array::from_fn(|a| axis_count(points, a));
    // An axis pinned by its bounds (the resolution of a model without images) is constant.
    let pinned: [bool; 3] = std::array::from_fn(|a| lo[a] >= 1.0 - 1e-12);
    if let Some(a) = (0..3).find(|&a| counts[a] < 2 && !pinned[a]) {
        bail!(
            "the accuracy predictor needs at least 2 distinct values on every axis, {} has {} \
             (the dense point and at least one pruned point); collect more depth/width/resolution points",
            ["depth", "width", "resolution"][a],
            counts[a]
        );
    }
    let caps: [usize; 3] = std::array::from_fn(|a| {
        if pinned[a] {
            0
        } else {
            counts[a].saturating_sub(2).clamp(1, 3)
        }
    });
    let degrees_for = |k: usize| -> [usize; 3] { std::array::from_fn(|a| k.min(caps[a])) };
    let max_k = caps.into_iter().max().unwrap_or(1);
    let ridge = 1e-8;
    let mut loo = Vec::new();
    for k in 1..=max_k {
        loo.push((k, loo_rmse_degrees(points, degrees_for(k), ridge)?));
    }
    let mut order: Vec<(usize, f64)> = loo.clone();
    order.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut k = order[0].0;
    loop {
        let m = fit_degrees(points, 1, degrees_for(k), ridge)?;
        if m.min_slope(lo, 12) >= -1e-6 || k == 1 {
            return Ok((m, loo));
        }
        k -= 1;
    }
}
