//! Safe wrapper over the `gemm` crate for row-major f32 matrices with explicit strides.

use gemm::Parallelism;

/// A strided read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows x cols`.
    pub fn rm(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major `rows x cols` matrix (so `cols x rows`).
    pub fn rm_t(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

/// Multiply-adds under which a product inside an inference pass runs single-threaded.
const SMALL_PRODUCT: usize = 1 << 22;

/// `dst[m x n] (row-major) = (accumulate ? dst : 0) + a[m x k] * b[k x n]`.
/// `parallel` lets gemm use the rayon pool (for a lone large product).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].iter_mut().for_each(|x| *x = 0.0);
        }
        return;
    }
    assert!(dst.len() >= m * n, "gemm dst too small");
    assert!(
        a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs,
        "gemm lhs too small"
    );
    assert!(
        b.data.len() > (k - 1) * b.rs + (n - 1) * b.cs,
        "gemm rhs too small"
    );
    // Inside an inference pass no product goes to rayon: its idle worker, woken, spun
    // beside the pass's own helper on the other core (the pruned MLP's 640→10 output
    // layer at batch 64: every pass of some processes ran at half speed, the helper
    // starved, 0.46 against 0.23 ms). A small product stays on this thread, a large one
    // is cut into blocks of rows (or columns) on the kernels' pool.
    let on_pool = super::par::on_pool();
    if parallel && on_pool && m * n * k >= SMALL_PRODUCT {
        let parts = 4 * rayon::current_num_threads().max(1);
        // SAFETY: bounds checked above; the blocks write disjoint parts of `dst`.
        let d = super::conv_tiles::OutPtr(dst.as_mut_ptr());
        let d = &d;
        // Blocks of whole rows (a tall product) or of columns (a wide one).
        let by_rows = m >= 16 * parts || m >= n;
        let size = if by_rows {
            m.div_ceil(parts).next_multiple_of(8).min(m)
        } else {
            n.div_ceil(parts).next_multiple_of(16).min(n)
        };
        super::par::for_each((if by_rows { m } else { n }).div_ceil(size), |i| {
            let at = i * size;
            // (rows, cols, offsets into dst, a, b) of block i.
            let (bm, bn, d_at, a_at, b_at) = if by_rows {
                (size.min(m - at), n, at * n, at * a.rs, 0)
            } else {
                (m, size.min(n - at), at, 0, at * b.cs)
            };
            // SAFETY: block i lies inside every operand (bounds checked above).
            unsafe {
                raw(
                    (bm, bn, k),
                    d.0.add(d_at),
                    n,
                    1,
                    accumulate,
                    a.data.as_ptr().add(a_at),
                    a,
                    b.data.as_ptr().add(b_at),
                    b,
                    Parallelism::None,
                )
            }
        });
        return;
    }
    let par = if parallel && !on_pool && !super::par::is_alone() {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: bounds checked above; dst does not alias a or b (distinct borrows).
    unsafe {
        raw(
            (m, n, k),
            dst.as_mut_ptr(),
            n,
            1,
            accumulate,
            a.data.as_ptr(),
            a,
            b.data.as_ptr(),
            b,
            par,
        )
    }
}

/// The `gemm` crate's call for `dst[m x n]` (row stride `drs`, column stride `dcs`) from
/// `a` and `b` at the given base pointers with their views' strides.
///
/// # Safety
/// Every element addressed through the pointers and strides must be in bounds, `dst`
/// must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    drs: usize,
    dcs: usize,
    accumulate: bool,
    ap: *const f32,
    a: Mat,
    bp: *const f32,
    b: Mat,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dcs as isize,
        drs as isize,
        accumulate,
        ap,
        a.cs as isize,
        a.rs as isize,
        bp,
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    )
}

/// Rows per thread when a product's `m` output rows are split into one single-threaded
/// GEMM per thread (measured faster on 2 cores than the GEMM's own threading, which
/// synchronises inside every product): whole micro-kernel tiles of 16 rows, at least two
/// tiles per block, and at least two blocks; `None` when `m` is too small to split.
pub fn row_blocks(m: usize) -> Option<usize> {
    let threads = rayon::current_num_threads();
    let rows = m.div_ceil(threads.max(1)).next_multiple_of(16);
    (threads >= 2 && rows < m && rows >= 32).then_some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large product inside an inference pass is cut into row blocks (tall) or column
    /// blocks (wide) on the kernels' pool: the same result as one single-threaded call,
    /// with strided and transposed operands and accumulation.
    #[test]
    fn pool_blocks_match_one_call() {
        // (m, n, k): tall (rows), wide (columns), both with ragged blocks.
        for (m, n, k) in [(517, 97, 111), (19, 2001, 130), (40, 900, 129)] {
            assert!(m * n * k >= SMALL_PRODUCT);
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let init: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
            for (accumulate, a_t) in [(false, false), (true, true)] {
                // `a` as given, or its transpose read through strides.
                let at: Vec<f32>;
                let av = if a_t {
                    at = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                    Mat::rm_t(&at, m)
                } else {
                    Mat::rm(&a, k)
                };
                let mut want = init.clone();
                sgemm(m, n, k, &mut want, av, Mat::rm(&b, n), accumulate, false);
                let mut got = init.clone();
                crate::util::on_pool(|| {
                    crate::kernels::par::engaged(|| {
                        sgemm(m, n, k, &mut got, av, Mat::rm(&b, n), accumulate, true)
                    })
                });
                assert_eq!(got, want, "{m}×{n}×{k} accumulate {accumulate}");
            }
        }
    }
}
