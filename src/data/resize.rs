//! Bilinear image resize (half-pixel centres, like PyTorch `align_corners=False`), used
//! when a model's input resolution differs from the data's (resolution pruning). One
//! implementation for training and evaluation.

use anyhow::Result;
use candle_core::Tensor;

/// Source index pairs and weights along one axis.
fn taps(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f32 / dst as f32;
    (0..dst)
        .map(|o| {
            let x = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (x.floor() as usize).min(src - 1);
            let i1 = (i0 + 1).min(src - 1);
            (i0, i1, x - i0 as f32)
        })
        .collect()
}

/// Resizes a `[B, C, H, W]` batch to `[B, C, h, w]`.
pub fn bilinear(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, c, sh, sw) = x.dims4()?;
    if (sh, sw) == (h, w) {
        return Ok(x.clone());
    }
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let (ty, tx) = (taps(sh, h), taps(sw, w));
    let mut out = vec![0f32; b * c * h * w];
    for (plane, o) in v.chunks_exact(sh * sw).zip(out.chunks_exact_mut(h * w)) {
        for (oy, &(y0, y1, fy)) in ty.iter().enumerate() {
            for (ox, &(x0, x1, fx)) in tx.iter().enumerate() {
                let top = plane[y0 * sw + x0] * (1.0 - fx) + plane[y0 * sw + x1] * fx;
                let bot = plane[y1 * sw + x0] * (1.0 - fx) + plane[y1 * sw + x1] * fx;
                o[oy * w + ox] = top * (1.0 - fy) + bot * fy;
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, c, h, w), x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn constant_images_stay_constant_and_2x_down_averages_pairs() {
        let x = Tensor::full(3f32, (1, 2, 8, 8), &Device::Cpu).unwrap();
        let y: Vec<f32> = bilinear(&x, 5, 6)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(y.iter().all(|v| (v - 3.0).abs() < 1e-6));
        let x = Tensor::arange(0f32, 4., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let y: Vec<f32> = bilinear(&x, 1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![0.5, 2.5]);
    }
}
