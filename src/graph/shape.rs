//! Per-sample tensor shapes. The batch dimension is never part of a graph shape: a
//! graph describes one sample, so costs are per sample and any batch size runs.

/// Shape of one sample, e.g. `[C, H, W]` for images or `[F]` for feature vectors.
pub type Shape = Vec<usize>;

/// Number of elements of a per-sample shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Formats a shape as `3x32x32`.
pub fn fmt_shape(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// Output length of a sliding window (convolution or pooling) along one axis, PyTorch
/// semantics (floor, or ceil when `ceil_mode`). `None` if the window does not fit.
pub fn window_out(
    len: usize,
    kernel: usize,
    stride: usize,
    pad_before: usize,
    pad_after: usize,
    dilation: usize,
    ceil_mode: bool,
) -> Option<usize> {
    let span = dilation * (kernel - 1) + 1;
    let padded = len + pad_before + pad_after;
    if padded < span || stride == 0 {
        return None;
    }
    let num = padded - span;
    let mut out = num / stride + 1;
    if ceil_mode && !num.is_multiple_of(stride) {
        out += 1;
        // PyTorch: the last window must start inside the (left-padded) input.
        if (out - 1) * stride >= len + pad_before {
            out -= 1;
        }
    }
    Some(out)
}
