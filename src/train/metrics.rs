//! Accuracy counting.

use anyhow::Result;
use candle_core::Tensor;

/// Number of rows whose label is among the top-1 and top-5 logits. Ties count against
/// the label (a label is in the top k when fewer than k logits are strictly greater).
pub fn topk_correct(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let l: Vec<Vec<f32>> = logits.to_vec2()?;
    let y: Vec<u32> = labels.to_vec1()?;
    let (mut t1, mut t5) = (0, 0);
    for (row, &lab) in l.iter().zip(&y) {
        let v = row[lab as usize];
        let greater = row.iter().filter(|&&x| x > v).count();
        if greater < 1 {
            t1 += 1;
        }
        if greater < 5 {
            t5 += 1;
        }
    }
    Ok((t1, t5))
}
