//! STAMP as a job stage: encode a target sample set, generate gates, threshold them (or
//! meet a MACs budget), fold into batch norm, remove channels; a new head if the target
//! has other classes. Fine-tuning is the job's common final stage.

use super::{Ctx, Pruned};
use crate::graph::Graph;
use crate::methods::stamp::{gates, head, meta, store};
use crate::prune::{self, Budget};
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

/// Settings of a STAMP run.
#[derive(Clone, Debug)]
pub struct StampRun {
    /// The meta-trained generator (`lopper stamp meta-train`).
    pub generator: PathBuf,
    /// Baseline: the generator's widths per group but random channels.
    pub random: bool,
    /// Target-time adaptation steps (gated SGD on the target before pruning).
    pub adapt: usize,
    /// Target samples the set encoder reads.
    pub set_size: usize,
}

/// Keeps as many gates open per group as `z` has, but chosen at random.
fn randomise(z: &mut [Vec<f32>], seed: u64) {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ 0x5EED);
    for zs in z.iter_mut() {
        let k = zs.iter().filter(|v| **v != 0.0).count();
        let mut idx: Vec<usize> = (0..zs.len()).collect();
        idx.shuffle(&mut rng);
        zs.iter_mut().for_each(|v| *v = 0.0);
        for &i in &idx[..k] {
            zs[i] = 1.0;
        }
    }
}

pub(super) fn prune(m: &StampRun, dense: &Graph, budget: Budget, ctx: &Ctx) -> Result<Pruned> {
    let macs = match budget {
        Budget::Macs(f) => Some(f),
        Budget::Ratio(0.0) => None,
        _ => bail!("STAMP takes a MACs target (a fraction of the dense MACs) or ratio 0 (the generator's own threshold)"),
    };
    let (st, _) = store::load(&m.generator, dense)?;
    let t = Instant::now();
    let target = ctx.train;
    let set = meta::sample_set(target, m.set_size, ctx.seed)?;
    let (mut z, tau) = st.target_gates(dense, target, &set, macs)?;
    if m.random {
        randomise(&mut z, ctx.seed);
    }
    let out_width = dense.shapes()?[dense.outputs[0]].iter().product::<usize>();
    let pruned = if m.adapt > 0 {
        // Adapt a copy with the target's head through the generated gates, then prune it.
        let net = head::with_head(dense, target.num_classes, ctx.seed)?;
        let params = st.gate_params(dense, target, &set)?;
        let (lr, batch) = (ctx.training.lr, ctx.training.batch_size);
        let net = st.adapt(&net, target, &params, m.adapt, lr, batch, ctx.seed)?;
        let groups = prune::dependency_groups(&net)?;
        let sites = gates::gate_sites(&net, &groups);
        gates::fold_and_prune(&net, &groups, &sites, &z)?
    } else {
        let pruned = gates::fold_and_prune(dense, &st.groups, &st.sites, &z)?;
        if out_width != target.num_classes {
            head::with_head(&pruned, target.num_classes, ctx.seed)?
        } else {
            pruned
        }
    };
    let kept: Vec<usize> = z
        .iter()
        .map(|v| v.iter().filter(|x| **x != 0.0).count())
        .collect();
    Ok(Pruned {
        graph: pruned,
        prune_seconds: t.elapsed().as_secs_f64(),
        train_seconds: 0.0,
        details: Some(serde_json::json!({
            "threshold": tau,
            "kept_per_group": kept,
            "set_size": m.set_size,
            "adapt_steps": m.adapt,
        })),
    })
}
