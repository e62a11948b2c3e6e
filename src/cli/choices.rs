//! The options that take one of a fixed set of names, as clap `ValueEnum`s: clap lists the
//! allowed names in `--help` and in the error for any other, and the code below matches
//! exhaustively instead of comparing strings.

use clap::ValueEnum;
use lopper::prune::{Criterion, Scope};

/// The name a value has on the command line (and in reports).
pub fn name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// `prune --method`: an importance criterion of the engine, or a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PruneMethod {
    Random,
    L1,
    L2,
    Fpgm,
    #[value(alias = "slim")]
    BnScale,
    Taylor,
    ActMean,
    Apoz,
    /// i-SpaSP (sparse signal recovery per two-layer module).
    Ispasp,
    /// DWR (depth, width and resolution under a MACs budget).
    Dwr,
    /// STAMP (needs --generator).
    Stamp,
}

impl PruneMethod {
    /// The engine criterion, for the criterion "methods".
    pub fn criterion(self) -> Option<Criterion> {
        CriterionArg::from_method(self).map(CriterionArg::criterion)
    }
}

/// An importance criterion (`sensitivity --method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CriterionArg {
    Random,
    L1,
    L2,
    Fpgm,
    #[value(alias = "slim")]
    BnScale,
    Taylor,
    ActMean,
    Apoz,
}

impl CriterionArg {
    pub fn criterion(self) -> Criterion {
        match self {
            CriterionArg::Random => Criterion::Random,
            CriterionArg::L1 => Criterion::L1,
            CriterionArg::L2 => Criterion::L2,
            CriterionArg::Fpgm => Criterion::Fpgm,
            CriterionArg::BnScale => Criterion::BnScale,
            CriterionArg::Taylor => Criterion::Taylor,
            CriterionArg::ActMean => Criterion::ActMean,
            CriterionArg::Apoz => Criterion::Apoz,
        }
    }

    fn from_method(m: PruneMethod) -> Option<CriterionArg> {
        Some(match m {
            PruneMethod::Random => CriterionArg::Random,
            PruneMethod::L1 => CriterionArg::L1,
            PruneMethod::L2 => CriterionArg::L2,
            PruneMethod::Fpgm => CriterionArg::Fpgm,
            PruneMethod::BnScale => CriterionArg::BnScale,
            PruneMethod::Taylor => CriterionArg::Taylor,
            PruneMethod::ActMean => CriterionArg::ActMean,
            PruneMethod::Apoz => CriterionArg::Apoz,
            PruneMethod::Ispasp | PruneMethod::Dwr | PruneMethod::Stamp => return None,
        })
    }
}

/// `--scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    /// The same ratio in every group.
    Local,
    /// One ranking across groups.
    Global,
}

impl ScopeArg {
    pub fn scope(self) -> Scope {
        match self {
            ScopeArg::Local => Scope::Local,
            ScopeArg::Global => Scope::Global,
        }
    }
}

/// i-SpaSP `--bn-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BnModeArg {
    /// Eval-consistent batch norm in the pruned branch.
    Eval,
    /// Batch statistics, as the official code.
    Code,
}

/// i-SpaSP `--threshold`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ThresholdArg {
    Activation,
    Importance,
}

/// DWR `--dwr-axes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DwrAxes {
    All,
    Depth,
    Width,
    Resolution,
}

impl DwrAxes {
    /// Which of (depth, width, resolution) may change.
    pub fn mask(self) -> [bool; 3] {
        match self {
            DwrAxes::All => [true; 3],
            DwrAxes::Depth => [true, false, false],
            DwrAxes::Width => [false, true, false],
            DwrAxes::Resolution => [false, false, true],
        }
    }
}

/// `sparsify --method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SparsifyMethod {
    /// Uniform per-layer magnitude.
    Magnitude,
    /// One global magnitude threshold.
    Global,
    Wanda,
    /// Optimal-brain-surgeon updates from the calibration inputs' Gram matrices.
    Sparsegpt,
    Pot,
    Unipts,
}

/// UniPTS `--search`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SearchArg {
    /// The evolutionary search.
    Ga,
    /// The uniform [P] genome (ablation).
    None,
}

/// `train --optimizer`, `prune --optimizer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    Sgd,
    Adamw,
}

impl OptimizerArg {
    /// The optimizer (SGD's momentum and Nesterov flag given; AdamW with PyTorch's betas).
    pub fn kind(self, momentum: f64, nesterov: bool) -> lopper::train::OptimizerKind {
        use lopper::train::OptimizerKind;
        match self {
            OptimizerArg::Sgd => OptimizerKind::Sgd { momentum, nesterov },
            OptimizerArg::Adamw => OptimizerKind::Adamw {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        }
    }
}

/// `--input-scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InputScale {
    /// Per-channel mean/std.
    Normalized,
    /// [0, 1].
    Unit,
    /// 0..255, for models that expect raw pixels such as mnist-8.onnx.
    Raw,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_engine_and_the_recipes() {
        for c in CriterionArg::value_variants() {
            assert_eq!(name(c), c.criterion().name());
        }
        let known: Vec<String> = SparsifyMethod::value_variants().iter().map(name).collect();
        assert_eq!(known, lopper::recipe::SPARSIFY_METHODS);
        assert_eq!(
            PruneMethod::from_str("slim", false),
            Ok(PruneMethod::BnScale)
        );
    }
}
