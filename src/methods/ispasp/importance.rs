//! The importance `z_i = Σ_{b,y,x} ∂F/∂H[b,i,y,x]` in closed form (spec §3.4), without
//! autodiff: the second layer is affine, so `∂F/∂H = Jᵀ R'` and its sum over batch and
//! positions reduces to weights times (border-aware) partial sums of the residual `R'`
//! (the residual already multiplied by the batch-norm scale, if any). Sums are in f64.

/// Linear second layer `W ∈ R^{C×F}` (row-major): `z_f = Σ_c W[c,f] · Σ_b R'[b,c]`.
pub fn linear(r: &[f32], batch: usize, w: &[f32], out: usize, inp: usize) -> Vec<f64> {
    debug_assert_eq!(r.len(), batch * out);
    debug_assert_eq!(w.len(), out * inp);
    let mut col = vec![0f64; out];
    for row in r.chunks_exact(out) {
        col.iter_mut().zip(row).for_each(|(c, &v)| *c += v as f64);
    }
    let mut z = vec![0f64; inp];
    for (c, wrow) in w.chunks_exact(inp).enumerate() {
        let q = col[c];
        z.iter_mut()
            .zip(wrow)
            .for_each(|(zi, &wv)| *zi += wv as f64 * q);
    }
    z
}

/// Geometry of a dense (groups = 1) convolution second layer.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    /// `[O, I, kh, kw]`.
    pub weight: [usize; 4],
    /// Input spatial size `[H, W]`.
    pub input: [usize; 2],
    /// Output spatial size `[Ho, Wo]`.
    pub output: [usize; 2],
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub padding: [usize; 4],
    pub dilation: [usize; 2],
}

/// Output positions `o` along one axis whose tap `k` reads a real (non-padding) input.
fn valid(o_len: usize, i_len: usize, k: usize, stride: usize, dil: usize, pad: usize) -> Vec<bool> {
    (0..o_len)
        .map(|o| {
            let pos = (o * stride + k * dil) as isize - pad as isize;
            pos >= 0 && (pos as usize) < i_len
        })
        .collect()
}

/// Conv second layer: `z_i = Σ_o Σ_{kh,kw} W[o,i,kh,kw] · Q_o(kh,kw)`, where `Q_o` sums
/// `R'[·,o,·,·]` over the output positions whose tap `(kh,kw)` lands inside the input.
/// `r` is `[B, O, Ho, Wo]` row-major.
pub fn conv(r: &[f32], batch: usize, w: &[f32], geo: &ConvGeom) -> Vec<f64> {
    let [o_n, i_n, kh_n, kw_n] = geo.weight;
    let [ho, wo] = geo.output;
    let plane = ho * wo;
    debug_assert_eq!(r.len(), batch * o_n * plane);
    // Batch-summed residual map per output channel.
    let mut smap = vec![0f64; o_n * plane];
    for b in 0..batch {
        let src = &r[b * o_n * plane..(b + 1) * o_n * plane];
        smap.iter_mut().zip(src).for_each(|(s, &v)| *s += v as f64);
    }
    let vy: Vec<Vec<bool>> = (0..kh_n)
        .map(|k| {
            valid(
                ho,
                geo.input[0],
                k,
                geo.stride[0],
                geo.dilation[0],
                geo.padding[0],
            )
        })
        .collect();
    let vx: Vec<Vec<bool>> = (0..kw_n)
        .map(|k| {
            valid(
                wo,
                geo.input[1],
                k,
                geo.stride[1],
                geo.dilation[1],
                geo.padding[1],
            )
        })
        .collect();
    let mut z = vec![0f64; i_n];
    let mut rows = vec![0f64; wo];
    for o in 0..o_n {
        let m = &smap[o * plane..(o + 1) * plane];
        for (kh, vyk) in vy.iter().enumerate() {
            rows.iter_mut().for_each(|x| *x = 0.0);
            for (y, _) in vyk.iter().enumerate().filter(|(_, &ok)| ok) {
                rows.iter_mut()
                    .zip(&m[y * wo..(y + 1) * wo])
                    .for_each(|(a, &b)| *a += b);
            }
            for (kw, vxk) in vx.iter().enumerate() {
                let q: f64 = rows
                    .iter()
                    .zip(vxk)
                    .filter(|(_, &ok)| ok)
                    .map(|(v, _)| v)
                    .sum();
                if q == 0.0 {
                    continue;
                }
                for (i, zi) in z.iter_mut().enumerate() {
                    let wv = w[((o * i_n + i) * kh_n + kh) * kw_n + kw];
                    *zi += wv as f64 * q;
                }
            }
        }
    }
    z
}
