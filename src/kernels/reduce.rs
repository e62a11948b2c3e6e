//! Reductions over a slice (sum, max, dot product) that vectorise: a plain `iter().sum()`
//! is one chain of dependent float adds (the compiler may not reassociate it), four
//! cycles per element; sixteen independent accumulators give the compiler vector lanes.
//! Inlined into their callers, so a multiversioned kernel gets its own instruction set.

/// Sixteen independent accumulators per reduction.
const LANES: usize = 16;

/// The largest value (NaNs are skipped; `-inf` for an empty slice).
#[inline(always)]
pub fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    tail.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// The sum.
#[inline(always)]
pub fn row_sum(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    tail.iter().chain(&acc).sum()
}

/// `Σ a·b` over the common length.
#[inline(always)]
pub fn row_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &p), &q) in acc.iter_mut().zip(x).zip(y) {
            *s += p * q;
        }
    }
    tail + acc.iter().sum::<f32>()
}
