//! Tiny dense least squares for the accuracy predictor (tens of rows, ≤ 30 columns):
//! Householder QR with column pivoting, which also gives the numerical rank, so a
//! rank-deficient design (a full tensor fitted on axis-only data) is detected, not solved.

/// Row-major `rows × cols` matrix.
#[derive(Clone, Debug)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub a: Vec<f64>,
}

impl Mat {
    pub fn from_rows(rows: &[Vec<f64>]) -> Mat {
        let cols = rows.first().map_or(0, |r| r.len());
        Mat {
            rows: rows.len(),
            cols,
            a: rows.iter().flatten().copied().collect(),
        }
    }
    fn at(&self, i: usize, j: usize) -> f64 {
        self.a[i * self.cols + j]
    }
}

/// QR with column pivoting: returns `(R as rows×cols row-major, Qᵀy, permutation)`.
fn qr_pivot(m: &Mat, y: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<usize>) {
    let (n, p) = (m.rows, m.cols);
    let mut a = m.a.clone();
    let mut b = y.to_vec();
    let mut perm: Vec<usize> = (0..p).collect();
    for k in 0..p.min(n) {
        // Pivot: the remaining column with the largest norm below row k.
        let norm = |a: &Vec<f64>, j: usize| (k..n).map(|i| a[i * p + j].powi(2)).sum::<f64>();
        let best = (k..p)
            .max_by(|&x, &y| norm(&a, x).total_cmp(&norm(&a, y)))
            .unwrap_or(k);
        if best != k {
            for i in 0..n {
                a.swap(i * p + k, i * p + best);
            }
            perm.swap(k, best);
        }
        let alpha = norm(&a, k).sqrt();
        if alpha == 0.0 {
            continue;
        }
        let sign = if a[k * p + k] >= 0.0 { 1.0 } else { -1.0 };
        let mut v: Vec<f64> = (k..n).map(|i| a[i * p + k]).collect();
        v[0] += sign * alpha;
        let vn: f64 = v.iter().map(|x| x * x).sum();
        for j in k..p {
            let dot: f64 = (k..n).map(|i| v[i - k] * a[i * p + j]).sum::<f64>() * 2.0 / vn;
            for i in k..n {
                a[i * p + j] -= dot * v[i - k];
            }
        }
        let dot: f64 = (k..n).map(|i| v[i - k] * b[i]).sum::<f64>() * 2.0 / vn;
        for i in k..n {
            b[i] -= dot * v[i - k];
        }
    }
    (a, b, perm)
}

/// Numerical rank (relative tolerance `1e-10` of the largest pivot).
pub fn rank(m: &Mat) -> usize {
    let (r, _, _) = qr_pivot(m, &vec![0.0; m.rows]);
    let d: Vec<f64> = (0..m.cols.min(m.rows))
        .map(|k| r[k * m.cols + k].abs())
        .collect();
    let top = d.first().copied().unwrap_or(0.0);
    d.iter().filter(|&&x| x > 1e-10 * top.max(1e-300)).count()
}

/// `argmin ‖Mx − y‖² + ridge·‖x‖²` (ridge relative to the largest column norm²).
pub fn lstsq(m: &Mat, y: &[f64], ridge: f64) -> Vec<f64> {
    let scale = (0..m.cols)
        .map(|j| (0..m.rows).map(|i| m.at(i, j).powi(2)).sum::<f64>())
        .fold(0.0, f64::max)
        .max(1e-300);
    let lam = (ridge * scale).sqrt();
    let mut rows: Vec<Vec<f64>> = (0..m.rows)
        .map(|i| m.a[i * m.cols..(i + 1) * m.cols].to_vec())
        .collect();
    let mut yy = y.to_vec();
    if lam > 0.0 {
        for j in 0..m.cols {
            let mut r = vec![0.0; m.cols];
            r[j] = lam;
            rows.push(r);
            yy.push(0.0);
        }
    }
    let aug = Mat::from_rows(&rows);
    let p = aug.cols;
    let (r, qty, perm) = qr_pivot(&aug, &yy);
    let mut x = vec![0.0; p];
    for k in (0..p.min(aug.rows)).rev() {
        let diag = r[k * p + k];
        if diag.abs() < 1e-300 {
            continue;
        }
        let s: f64 = (k + 1..p).map(|j| r[k * p + j] * x[j]).sum();
        x[k] = (qty[k] - s) / diag;
    }
    let mut out = vec![0.0; p];
    for (k, &j) in perm.iter().enumerate() {
        out[j] = x[k];
    }
    out
}
