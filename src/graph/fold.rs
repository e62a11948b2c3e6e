//! Folds every eval-mode batch norm that directly follows a convolution (its only
//! consumer) into that convolution's weight and bias: `w' = w·s`, `b' = (b − μ)·s + β`,
//! `s = γ/√(σ² + ε)`. The batch norm becomes an Identity, so node ids stay valid. This is
//! the form deployment runtimes (and OpenVINO POT, which the POT baseline follows) see.

use super::ops::{Identity, Op};
use super::{param_key, Graph};
use anyhow::Result;
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
        let Op::BatchNorm(bn) = &node.op else {
            continue;
        };
        let [i] = node.inputs[..] else { continue };
        let Op::Conv2d(c) = &g.nodes[i].op else {
            continue;
        };
        if consumers[i].len() != 1 || g.outputs.contains(&i) {
            continue;
        }
        let (bname, cname) = (&node.name, &g.nodes[i].name);
        let gamma = host(&param_key(bname, "weight"))?;
        let beta = host(&param_key(bname, "bias"))?;
        let mean = host(&param_key(bname, "running_mean"))?;
        let var = host(&param_key(bname, "running_var"))?;
        let s: Vec<f32> = gamma
            .iter()
            .zip(&var)
            .map(|(g, v)| g / (v + bn.eps as f32).sqrt())
            .collect();
        let wk = param_key(cname, "weight");
        let mut w = host(&wk)?;
        let per = w.len() / c.out_channels;
        for (o, row) in w.chunks_exact_mut(per).enumerate() {
            row.iter_mut().for_each(|v| *v *= s[o]);
        }
        let b0 = if c.bias {
            host(&param_key(cname, "bias"))?
        } else {
            vec![0.0; c.out_channels]
        };
        let b: Vec<f32> = (0..c.out_channels)
            .map(|o| (b0[o] - mean[o]) * s[o] + beta[o])
            .collect();
        let dims = g.params()[&wk].dims().to_vec();
        params.insert(wk, Tensor::from_vec(w, dims, &Device::Cpu)?);
        params.insert(
            param_key(cname, "bias"),
            Tensor::from_vec(b, c.out_channels, &Device::Cpu)?,
        );
        for p in ["weight", "bias", "running_mean", "running_var"] {
            params.remove(&param_key(bname, p));
        }
        if let Op::Conv2d(c) = &mut nodes[i].op {
            c.bias = true;
        }
        nodes[j].op = Op::Identity(Identity {});
    }
    Graph::with_parts(nodes, g.outputs.clone(), params)
}
