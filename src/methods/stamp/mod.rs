//! STAMP (Song et al., 2020): set-based task-adaptive meta-pruning. Spec:
//! `shared/specs/stamp.md` (the paper's text is unavailable; the spec's reference design is
//! followed). So far: the Beta-Bernoulli (BBDropout) channel gates — Kumaraswamy posterior
//! mean, reparameterised sample, KL to Beta(α, 1) and its gradients — with the spec's golden
//! values, and the Set Transformer blocks and set encoder with permutation-invariance tests
//! (`tests/stamp.rs`), and the gate sites on the engine's dependency groups with the
//! gated ≡ physically pruned invariant ([`gates`]), and the mask generator with
//! differentiable gate sampling and the KL surrogate ([`generator`]), first-order
//! meta-training over class-subset tasks and target-time pruning with an optional MACs
//! budget ([`meta`]), generators saved with their architecture fingerprint ([`store`]), a
//! new head for the target classes ([`head`]); CLI `lopper stamp meta-train` and
//! `lopper prune --method stamp --generator G` with optional target-time adaptation
//! (`--stamp-adapt K`) and the random-at-the-same-widths baseline (`--stamp-random`). Still
//! to do: the recorded comparisons of both settings (BENCHMARKS §10).

pub mod bbdrop;
pub mod gates;
pub mod generator;
pub mod head;
pub mod meta;
pub mod set_encoder;
pub mod special;
pub mod store;
pub mod toy;
