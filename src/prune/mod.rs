//! The structural pruning engine: dependency groups derived from each op's coupling rule,
//! and surgery that returns a physically smaller graph.

pub mod deps;
pub mod surgery;

pub use deps::{dependency_groups, Group, Groups, Member, Unit};
pub use surgery::{consumer_masks, predict_cost, remove_units, Removal};
