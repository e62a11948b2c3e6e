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
    // Inside an inference pass a small product stays on this thread: handing it to
    // rayon woke rayon's idle worker, which then spun beside the pass's own helper on
    // the other core (the pruned MLP's 640→10 output layer at batch 64: every pass of
    // some processes ran at half speed, the helper starved, 0.46 against 0.23 ms).
    let small = m * n * k < SMALL_PRODUCT && super::par::on_pool();
    let par = if parallel && !small && !super::par::is_alone() {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: bounds checked above; dst does not alias a or b (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
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
