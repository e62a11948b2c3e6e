//! The structural pruning engine: dependency groups derived from each op's coupling rule,
//! and surgery that returns a physically smaller graph.

pub mod criteria;
pub mod deps;
pub mod depth;
pub mod embedding;
pub mod plan;
pub mod sensitivity;
pub mod stats;
pub mod surgery;

pub use criteria::{collect_stats, Criterion, Stats};
pub use deps::{
    blocked_groups, dependency_groups, Block, BlockedGroup, Group, Groups, Member, Unit,
};
pub use depth::{remove_blocks, residual_blocks, with_resolution, ResidualBlock};
pub use embedding::allow_embedding_pruning;
pub use plan::{plan, Budget, PlanConfig, Scope};
pub use sensitivity::{sensitivity, SensitivityRow};
pub use surgery::{consumer_masks, predict_cost, remove_units, Removal};
