//! What a forward pass reads: one tensor per graph input. Most models have one (an image
//! batch, passed as a plain [`Tensor`]); token models have several (ids and an attention
//! mask, an [`Inputs`] in the order of the graph's Input nodes). Both implement
//! [`AsInputs`], so every entry point takes either.

use candle_core::Tensor;

/// One batch tensor per graph input, in the order of the graph's Input nodes.
#[derive(Clone, Debug)]
pub struct Inputs(pub Vec<Tensor>);

impl Inputs {
    /// Batch size (the leading axis of the first input).
    pub fn batch(&self) -> usize {
        self.0
            .first()
            .map_or(0, |t| t.dims().first().copied().unwrap_or(0))
    }
}

/// A batch of inputs for a forward pass: a single tensor, or one per graph input.
pub trait AsInputs {
    fn tensors(&self) -> Vec<&Tensor>;
}

impl AsInputs for Tensor {
    fn tensors(&self) -> Vec<&Tensor> {
        vec![self]
    }
}

impl AsInputs for Inputs {
    fn tensors(&self) -> Vec<&Tensor> {
        self.0.iter().collect()
    }
}

impl AsInputs for [&Tensor] {
    fn tensors(&self) -> Vec<&Tensor> {
        self.to_vec()
    }
}
