//! Accuracy counting.

use anyhow::{bail, Result};
use candle_core::Tensor;

/// Counts of one batch: rows whose label is the top-1 / among the top-5 logits, and rows
/// with a non-finite logit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopK {
    pub top1: usize,
    pub top5: usize,
    pub non_finite: usize,
}

/// Top-1/top-5 counts. Ties count against the label (a label is in the top k when fewer
/// than k logits are strictly greater). A row with any NaN or infinite logit counts as
/// wrong: NaN compares false with everything, so without this rule a model whose outputs
/// are all NaN would score 100 %.
pub fn topk_correct(logits: &Tensor, labels: &Tensor) -> Result<TopK> {
    let l: Vec<Vec<f32>> = logits.to_vec2()?;
    let y: Vec<u32> = labels.to_vec1()?;
    let mut t = TopK::default();
    for (i, (row, &lab)) in l.iter().zip(&y).enumerate() {
        let Some(&v) = row.get(lab as usize) else {
            bail!(
                "sample {i} of the batch has label {lab}, but the model has {} outputs",
                row.len()
            );
        };
        if row.iter().any(|x| !x.is_finite()) {
            t.non_finite += 1;
            continue;
        }
        let greater = row.iter().filter(|&&x| x > v).count();
        if greater < 1 {
            t.top1 += 1;
        }
        if greater < 5 {
            t.top5 += 1;
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nan_rows_are_wrong_and_counted() {
        let d = Device::Cpu;
        let logits = Tensor::new(
            &[
                [f32::NAN, f32::NAN, f32::NAN],
                [0.0, 1.0, 0.5],
                [f32::INFINITY, 0.0, 0.0],
            ],
            &d,
        )
        .unwrap();
        let labels = Tensor::new(&[0u32, 1, 0], &d).unwrap();
        let t = topk_correct(&logits, &labels).unwrap();
        assert_eq!(
            t,
            TopK {
                top1: 1,
                top5: 1,
                non_finite: 2
            }
        );
    }

    #[test]
    fn label_outside_the_outputs_is_an_error() {
        let d = Device::Cpu;
        let logits = Tensor::zeros((1, 10), candle_core::DType::F32, &d).unwrap();
        let labels = Tensor::new(&[200u32], &d).unwrap();
        let e = topk_correct(&logits, &labels).unwrap_err().to_string();
        assert!(e.contains("label 200") && e.contains("10 outputs"), "{e}");
    }
}
