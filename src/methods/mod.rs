//! Pruning methods built on the structural engine, one module each with its spec's tests.

pub mod dwr;
pub mod ispasp;
pub mod job;
pub mod pts;
pub mod report;
pub mod sparsify;
pub mod stamp;
pub mod unipts;
