//! A small Vision Transformer for 32×32 images (patch 4 → 64 tokens), channels-first:
//! the patch embedding is a strided conv whose `[D, 8, 8]` output is the token tensor
//! (the 8×8 positions are the tokens; no reshape), projections are 1×1 convs, and
//! [`MultiHeadAttention`] and [`LayerNorm`] act on the channel axis. Pre-norm blocks
//! (`x + attn(LN(x))`, `x + FFN(LN(x))`, GELU), a learned position embedding, and mean
//! pooling over tokens before the classifier, as in the CIFAR-sized ViTs of the
//! compact-transformer literature (`-cls`: a learned class token and its output instead,
//! as in ViT-B).
//!
//! The pruning units fall out of the ops' coupling rules: heads (q/k/v rows of `in_proj`
//! plus columns of `out_proj`), FFN hidden units (`fc1` rows plus `fc2` columns), and the
//! embedding dimension through every residual add and LayerNorm (kept unless asked).

use crate::graph::ops::{
    ActivationKind, ClassToken, Conv2d, LayerNorm, MultiHeadAttention, Op, PosEmbed, TokenSelect,
};
use crate::graph::{Graph, GraphBuilder};
use anyhow::{bail, Result};

/// Width, depth, heads, patch and FFN ratio of a ViT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VitConfig {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub patch: usize,
    pub mlp_ratio: usize,
    /// Classify from a learned class token (ViT-B's head) instead of the token mean.
    pub class_token: bool,
}

impl Default for VitConfig {
    /// ~1.2 M parameters and ~76 M MACs per 32×32 image: an epoch of CIFAR-10 in minutes.
    fn default() -> Self {
        VitConfig {
            dim: 128,
            depth: 6,
            heads: 4,
            patch: 4,
            mlp_ratio: 2,
            class_token: false,
        }
    }
}

impl VitConfig {
    /// Parses `DIM-DEPTH-HEADS[-PATCH[-MLP_RATIO]][-cls]`.
    pub fn parse(s: &str) -> Result<Self> {
        let (s, class_token) = match s.strip_suffix("-cls") {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let v: Vec<usize> = s
            .split('-')
            .map(|p| p.parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                anyhow::anyhow!("ViT sizes '{s}' are not DIM-DEPTH-HEADS[-PATCH[-MLP]]")
            })?;
        let d = VitConfig::default();
        if !(3..=5).contains(&v.len()) {
            bail!("ViT sizes '{s}' are not DIM-DEPTH-HEADS[-PATCH[-MLP]]");
        }
        Ok(VitConfig {
            dim: v[0],
            depth: v[1],
            heads: v[2],
            patch: v.get(3).copied().unwrap_or(d.patch),
            mlp_ratio: v.get(4).copied().unwrap_or(d.mlp_ratio),
            class_token,
        })
    }
}

pub fn vit(shape: &[usize], classes: usize, cfg: VitConfig, seed: u64) -> Result<Graph> {
    let VitConfig {
        dim,
        depth,
        heads,
        patch,
        mlp_ratio,
        class_token,
    } = cfg;
    if heads == 0 || !dim.is_multiple_of(heads) {
        bail!("ViT width {dim} is not divisible into {heads} heads");
    }
    if patch == 0 || !shape[1].is_multiple_of(patch) || !shape[2].is_multiple_of(patch) {
        bail!(
            "ViT patch {patch} does not tile the {}x{} input",
            shape[1],
            shape[2]
        );
    }
    let tokens = (shape[1] / patch) * (shape[2] / patch);
    let mut b = GraphBuilder::new(seed);
    let x = b.input(shape)?;
    let mut x = b.conv(
        "patch_embed",
        x,
        Conv2d::new(shape[0], dim, patch, patch, 0).with_bias(true),
    )?;
    if class_token {
        x = b.add(
            "class_token",
            Op::ClassToken(ClassToken { channels: dim }),
            &[x],
        )?;
    }
    x = b.add(
        "pos_embed",
        Op::PosEmbed(PosEmbed {
            channels: dim,
            tokens: tokens + usize::from(class_token),
        }),
        &[x],
    )?;
    let pointwise = |i: usize, o: usize| Conv2d::new(i, o, 1, 1, 0).with_bias(true);
    for l in 0..depth {
        let p = format!("blocks.{l}");
        let y = b.add(
            &format!("{p}.norm1"),
            Op::LayerNorm(LayerNorm::new(dim)),
            &[x],
        )?;
        let y = b.conv(&format!("{p}.attn.in_proj"), y, pointwise(dim, 3 * dim))?;
        let y = b.add(
            &format!("{p}.attn"),
            Op::MultiHeadAttention(MultiHeadAttention::new(heads, dim / heads)),
            &[y],
        )?;
        let y = b.conv(&format!("{p}.attn.out_proj"), y, pointwise(dim, dim))?;
        x = b.add_nodes(x, y)?;
        let y = b.add(
            &format!("{p}.norm2"),
            Op::LayerNorm(LayerNorm::new(dim)),
            &[x],
        )?;
        let y = b.conv(&format!("{p}.mlp.fc1"), y, pointwise(dim, mlp_ratio * dim))?;
        let y = b.act(y, ActivationKind::Gelu)?;
        let y = b.conv(&format!("{p}.mlp.fc2"), y, pointwise(mlp_ratio * dim, dim))?;
        x = b.add_nodes(x, y)?;
    }
    let x = b.add("norm", Op::LayerNorm(LayerNorm::new(dim)), &[x])?;
    let x = if class_token {
        b.add("cls", Op::TokenSelect(TokenSelect { index: 0 }), &[x])?
    } else {
        let x = b.gap(x)?;
        b.flatten(x)?
    };
    let x = b.linear("head", x, dim, classes)?;
    b.finish(&[x])
}
