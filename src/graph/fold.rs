//! Folds every eval-mode batch norm that directly follows a convolution (its only
//! consumer) into that convolution's weight and bias: `w' = w·s`, `b' = (b − μ)·s + β`,
//! `s = γ/√(σ² + ε)`. The batch norm becomes an Identity, so node ids stay valid. This is
//! the form deployment runtimes (and OpenVINO POT, which the POT baseline follows) see.

use super::ops::param::{BIAS, RUNNING_MEAN, RUNNING_VAR, WEIGHT};
use super::ops::{Identity, Op};
use super::{param_key, Graph, NodeId};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

/// A new graph with batch norm folded into the preceding convs (the input is unchanged).
pub fn fold_batchnorm(g: &Graph) -> Result<Graph> {
    let consumers = g.consumers();
    let mut nodes = g.nodes.clone();
    let mut params: BTreeMap<String, Tensor> = g
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let host =
        |k: &str| -> Result<Vec<f32>> { Ok(g.params()[k].as_tensor().flatten_all()?.to_vec1()?) };
    for (j, node) in g.nodes.iter().enumerate() {
        if !matches!(node.op, Op::BatchNorm(_)) {
            continue;
        }
        let [i] = node.inputs[..] else { continue };
        let Op::Conv2d(c) = &g.nodes[i].op else {
            continue;
        };
        if consumers[i].len() != 1 || g.outputs.contains(&i) {
            continue;
        }
        let (bname, cname) = (&node.name, &g.nodes[i].name);
        let (scale, b) = conv_bn_affine(g, i, j)?;
        let wk = param_key(cname, WEIGHT);
        let mut w = host(&wk)?;
        scale_rows(&mut w, &scale);
        let dims = g.params()[&wk].dims().to_vec();
        params.insert(wk, Tensor::from_vec(w, dims, &Device::Cpu)?);
        params.insert(
            param_key(cname, BIAS),
            Tensor::from_vec(b, c.out_channels, &Device::Cpu)?,
        );
        for p in [WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR] {
            params.remove(&param_key(bname, p));
        }
        if let Op::Conv2d(c) = &mut nodes[i].op {
            c.bias = true;
        }
        nodes[j].op = Op::Identity(Identity {});
    }
    Graph::with_parts(nodes, g.outputs.clone(), params)?.keeping(g)
}

/// The per-output-channel affine `(s, b')` that folding batch norm `bn` into conv `conv`
/// gives: `s = γ/√(σ² + ε)`, `b' = (b − μ)·s + β` (the conv's weight rows are then scaled
/// by `s`). The one place this maths lives: the graph rewrite above and the execution
/// plan's run-time fold both call it.
pub fn conv_bn_affine(g: &Graph, conv: NodeId, bn: NodeId) -> Result<(Vec<f32>, Vec<f32>)> {
    let (Op::Conv2d(c), Op::BatchNorm(b)) = (&g.nodes[conv].op, &g.nodes[bn].op) else {
        bail!(
            "cannot fold '{}' into '{}': not a batch norm after a conv",
            g.nodes[bn].name,
            g.nodes[conv].name
        );
    };
    let host = |n: NodeId, p: &str| -> Result<Vec<f32>> {
        Ok(g.param(n, p)?.as_tensor().flatten_all()?.to_vec1()?)
    };
    let (gamma, beta) = (host(bn, WEIGHT)?, host(bn, BIAS)?);
    let (mean, var) = (host(bn, RUNNING_MEAN)?, host(bn, RUNNING_VAR)?);
    let scale: Vec<f32> = gamma
        .iter()
        .zip(&var)
        .map(|(g, v)| g / (v + b.eps as f32).sqrt())
        .collect();
    let conv_b = if c.bias {
        host(conv, BIAS)?
    } else {
        vec![0.0; c.out_channels]
    };
    let bias = (0..c.out_channels)
        .map(|o| (conv_b[o] - mean[o]) * scale[o] + beta[o])
        .collect();
    Ok((scale, bias))
}

/// Multiplies row `o` of a row-major weight (one row per output channel) by `scale[o]`.
pub fn scale_rows(w: &mut [f32], scale: &[f32]) {
    let per = w.len() / scale.len().max(1);
    w.chunks_exact_mut(per.max(1))
        .zip(scale)
        .for_each(|(row, s)| row.iter_mut().for_each(|v| *v *= s));
}
