//! Data statistics for the data-driven criteria, collected apart from the scoring so that
//! [`super::criteria`] stays a pure function of weights and these numbers.

use crate::data::Dataset;
use crate::exec::{forward_with, ForwardOpts, Mode};
use crate::graph::ops::Op;
use crate::graph::{Graph, NodeId};
use crate::train::fit_input;
use crate::train::loss::cross_entropy;
use anyhow::Result;
use candle_core::Device;
use std::collections::HashMap;

/// Data statistics for data-driven criteria.
#[derive(Default)]
pub struct Stats {
    /// Gradient of the loss w.r.t. each parameter (summed over the batches).
    pub grads: HashMap<String, Vec<f32>>,
    /// Per node output channel: mean activation and fraction of exact zeros.
    pub act_mean: HashMap<NodeId, Vec<f32>>,
    pub apoz: HashMap<NodeId, Vec<f32>>,
}

/// One pass over `samples` of `data`: parameter gradients (Taylor) and activation
/// statistics of every activation node (activation mean, APoZ).
pub fn collect_stats(g: &Graph, data: &Dataset, samples: usize, batch: usize) -> Result<Stats> {
    let n = samples.min(data.len());
    let acts: Vec<NodeId> = (0..g.nodes.len())
        .filter(|&i| matches!(g.nodes[i].op, Op::Activation(_)))
        .collect();
    let mut st = Stats::default();
    let mut count = 0usize;
    for chunk in (0..n).collect::<Vec<_>>().chunks(batch.max(1)) {
        let (x, y) = data.batch(chunk, None, &Device::Cpu)?;
        let x = fit_input(g, x)?;
        let opts = ForwardOpts {
            keep: &acts,
            update_stats: false,
            grad: true,
            ..ForwardOpts::new(Mode::Eval)
        };
        let out = forward_with(g, &x, &opts)?;
        let loss = cross_entropy(&out.outputs[0], &y, 0.0)?;
        let grads = loss.backward()?;
        for (k, v) in g.params() {
            if let Some(gr) = grads.get(v.as_tensor()) {
                let gv: Vec<f32> = gr.flatten_all()?.to_vec1()?;
                let e = st
                    .grads
                    .entry(k.clone())
                    .or_insert_with(|| vec![0.0; gv.len()]);
                e.iter_mut().zip(gv).for_each(|(a, b)| *a += b);
            }
        }
        for (&node, t) in &out.kept {
            let c = t.dim(1)?;
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let per = v.len() / (t.dim(0)? * c);
            let mean = st.act_mean.entry(node).or_insert_with(|| vec![0.0; c]);
            let zeros = st.apoz.entry(node).or_insert_with(|| vec![0.0; c]);
            for (i, x) in v.iter().enumerate() {
                let ch = (i / per) % c;
                mean[ch] += x.abs();
                if *x == 0.0 {
                    zeros[ch] += 1.0;
                }
            }
        }
        count += chunk.len();
    }
    // Means over samples and spatial positions.
    let shapes = g.shapes()?;
    for (node, v) in st.act_mean.iter_mut().chain(st.apoz.iter_mut()) {
        let per = shapes[*node].iter().skip(1).product::<usize>().max(1);
        v.iter_mut().for_each(|x| *x /= (count * per) as f32);
    }
    Ok(st)
}
