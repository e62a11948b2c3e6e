//! Maximising the predictor under the budget `d·w²·r² = T` on the box `[lo, 1]³`
//! (spec §6.2): a 400×400 grid over (d, w) with r eliminated, then Nelder–Mead
//! refinement, then the interior-optimum check `d F_d : w F_w : r F_r = 1 : 2 : 2`.

use super::map::Map;
use anyhow::{bail, Result};
use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Optimum {
    pub d: f64,
    pub w: f64,
    pub r: f64,
    pub f: f64,
    /// True when no box bound is active (then the elasticity ratios hold).
    pub interior: bool,
    /// `(w F_w / d F_d, r F_r / d F_d)`: (2, 2) at an interior optimum.
    pub elasticity: (f64, f64),
    /// The multiplier `μ = d F_d / F` (equal to `d P'/P` for rank 1).
    pub mu: f64,
}

/// `r` on the budget surface, or `None` outside the box.
fn r_of(d: f64, w: f64, t: f64, lo: f64) -> Option<f64> {
    let r = (t / (d * w * w)).sqrt();
    (r >= lo - 1e-12 && r <= 1.0 + 1e-12).then_some(r.clamp(lo, 1.0))
}

/// The budget floor of the box: `d_min · w_min² · r_min²`.
pub fn floor(lo: [f64; 3]) -> f64 {
    lo[0] * lo[1] * lo[1] * lo[2] * lo[2]
}

pub fn maximise(map: &Map, t: f64, lo: [f64; 3]) -> Result<Optimum> {
    if !(t > 0.0 && t <= 1.0) {
        bail!("the MACs budget {t} must be in (0, 1]");
    }
    if t < floor(lo) - 1e-12 {
        bail!(
            "the MACs budget {:.4} is below what any configuration in the box reaches ({:.4} = \
             d_min·w_min²·r_min² with lower bounds {:?})",
            t,
            floor(lo),
            lo
        );
    }
    let obj = |d: f64, w: f64| -> f64 {
        if !(lo[0] - 1e-12..=1.0 + 1e-12).contains(&d)
            || !(lo[1] - 1e-12..=1.0 + 1e-12).contains(&w)
        {
            return f64::NEG_INFINITY;
        }
        match r_of(d, w, t, lo[2]) {
            Some(r) => map.eval(d, w, r),
            None => f64::NEG_INFINITY,
        }
    };
    let n = 400;
    let mut best = (f64::NEG_INFINITY, 1.0, 1.0);
    for i in 0..n {
        let d = lo[0] + (1.0 - lo[0]) * i as f64 / (n - 1) as f64;
        for j in 0..n {
            let w = lo[1] + (1.0 - lo[1]) * j as f64 / (n - 1) as f64;
            let v = obj(d, w);
            if v > best.0 {
                best = (v, d, w);
            }
        }
    }
    if !best.0.is_finite() {
        bail!("no configuration in the box meets the budget {t}");
    }
    let (d, w) = nelder_mead(&obj, (best.1, best.2), 0.01);
    let r = r_of(d, w, t, lo[2]).expect("refined point is feasible");
    let f = map.eval(d, w, r);
    let g = map.grad(d, w, r);
    let (ed, ew, er) = (d * g[0], w * g[1], r * g[2]);
    let eps = 1e-6;
    let interior = [d, w, r]
        .iter()
        .zip(lo)
        .all(|(&x, l)| x > l + eps && x < 1.0 - eps);
    Ok(Optimum {
        d,
        w,
        r,
        f,
        interior,
        elasticity: (ew / ed, er / ed),
        mu: ed / f,
    })
}

/// Maximises `f` over 2-D from `start` (initial step `step`) to `|Δ| < 1e-10`.
fn nelder_mead(f: &dyn Fn(f64, f64) -> f64, start: (f64, f64), step: f64) -> (f64, f64) {
    let v = |p: [f64; 2]| -f(p[0], p[1]);
    let mut s = [
        [start.0, start.1],
        [start.0 + step, start.1],
        [start.0, start.1 + step],
    ];
    for _ in 0..2000 {
        s.sort_by(|a, b| v(*a).total_cmp(&v(*b)));
        let size = (s[1][0] - s[0][0])
            .abs()
            .max((s[1][1] - s[0][1]).abs())
            .max((s[2][0] - s[0][0]).abs())
            .max((s[2][1] - s[0][1]).abs());
        if size < 1e-10 {
            break;
        }
        let c = [(s[0][0] + s[1][0]) / 2.0, (s[0][1] + s[1][1]) / 2.0];
        let lerp = |t: f64| [c[0] + t * (s[2][0] - c[0]), c[1] + t * (s[2][1] - c[1])];
        let refl = lerp(-1.0);
        if v(refl) < v(s[0]) {
            let exp = lerp(-2.0);
            s[2] = if v(exp) < v(refl) { exp } else { refl };
        } else if v(refl) < v(s[1]) {
            s[2] = refl;
        } else {
            let con = lerp(0.5);
            if v(con) < v(s[2]) {
                s[2] = con;
            } else {
                for k in 1..3 {
                    s[k] = [(s[k][0] + s[0][0]) / 2.0, (s[k][1] + s[0][1]) / 2.0];
                }
            }
        }
    }
    s.sort_by(|a, b| v(*a).total_cmp(&v(*b)));
    (s[0][0], s[0][1])
}
