//! Execution mode and the rules it carries.

/// Training or evaluation; every mode-dependent decision of a forward asks the mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics, running averages updated, dropout active.
    Train,
    /// Running statistics, dropout off.
    Eval,
}

impl Mode {
    /// Batch norm normalises with the batch's own statistics (and may update the running
    /// averages) rather than the stored running statistics.
    pub fn batch_statistics(self) -> bool {
        self == Mode::Train
    }

    /// Dropout masks are drawn (otherwise dropout is the identity).
    pub fn dropout_active(self) -> bool {
        self == Mode::Train
    }

    /// Inference-only rewrites are valid: batch norm folded into the conv before it and
    /// sparse (CSR) kernels, both without a backward — provided no gradient is taken
    /// through the pass (`grad` in the plan options).
    pub fn inference_rewrites(self, grad: bool) -> bool {
        self == Mode::Eval && !grad
    }

    /// Intermediates are released as soon as their last consumer ran (training keeps
    /// them: the backward pass reads them).
    pub fn releases_intermediates(self) -> bool {
        self == Mode::Eval
    }
}
