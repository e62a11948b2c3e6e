//! `lopper stamp meta-train`: meta-trains STAMP's set encoder and mask generator on the
//! reference data and writes the generator file `lopper prune --method stamp` reads.

use super::{load_split, resolve_model, DataArgs, DeviceArgs, ModelArgs};
use anyhow::Result;
use clap::Args;
use lopper::data::Split;
use lopper::methods::stamp::{meta, store};
use lopper::util::Progress;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// `lopper stamp <subcommand>`.
#[derive(clap::Subcommand)]
pub enum StampCmd {
    /// Meta-train over class-subset tasks of the reference data (the model is the network
    /// pretrained on it); writes the generator.
    MetaTrain(Box<MetaTrainArgs>),
}

#[derive(clap::Args)]
pub struct StampArgs {
    #[command(subcommand)]
    cmd: StampCmd,
}

pub fn run(a: StampArgs) -> Result<()> {
    match a.cmd {
        StampCmd::MetaTrain(m) => meta_train(*m),
    }
}

#[derive(Args)]
pub struct MetaTrainArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 200, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    iterations: usize,
    #[arg(long, default_value_t = 4, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    tasks: usize,
    #[arg(long, default_value_t = 5, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    n_way: usize,
    #[arg(long, default_value_t = 10, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    n_per_class: usize,
    #[arg(long, default_value_t = 5)]
    inner_steps: usize,
    /// Weight of the gates' KL term (sparsity strength).
    #[arg(long, default_value_t = 1e-4, value_parser = super::argcheck::non_negative, allow_negative_numbers = true)]
    gamma: f64,
    /// Gated forwards use the pretrained BN running statistics instead of batch
    /// statistics (the BBDropout reference).
    #[arg(long)]
    frozen_bn: bool,
    /// Feed the generator the embedding centred on its running mean and RMS-scaled.
    #[arg(long)]
    center_embedding: bool,
    /// Ramp the KL weight from 0 over this fraction of the iterations.
    #[arg(long, default_value_t = 0.0, value_parser = super::argcheck::unit_closed, allow_negative_numbers = true)]
    kl_warmup: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(short, long)]
    output: PathBuf,
    #[arg(long)]
    json: bool,
}

impl MetaTrainArgs {
    fn config(&self) -> meta::MetaConfig {
        meta::MetaConfig {
            iterations: self.iterations,
            tasks: self.tasks,
            n_way: self.n_way,
            n_per_class: self.n_per_class,
            inner_steps: self.inner_steps,
            gamma: self.gamma,
            frozen_bn: self.frozen_bn,
            center_embedding: self.center_embedding,
            kl_warmup: self.kl_warmup,
            seed: self.seed,
            ..Default::default()
        }
    }
}

pub fn meta_train(a: MetaTrainArgs) -> Result<()> {
    let dev = a.device.open()?;
    lopper::util::check_writable(&a.output, "generator output")?;
    let ds = load_split(&a.data, Split::Train)?;
    let g = super::on_device(
        resolve_model(&a.model, Some(&ds), a.data.data_dir.as_deref())?,
        &dev,
    )?;
    let cfg = a.config();
    let st = meta::Stamp::new(&g, &cfg)?;
    let t = Instant::now();
    // Progress on stderr (a bar on a terminal, a line every few seconds otherwise), also
    // with --json; a summary line every 10 iterations.
    let progress = super::progress::Console::new();
    progress.start("meta-training", cfg.iterations as u64);
    let hist = st.meta_train(&g, &ds, &cfg, |l| {
        let status = format!(
            "outer CE {:.4}, KL {:.1}, mean E[pi] {:.3}",
            l.outer_ce, l.kl, l.mean_gate
        );
        if l.iteration % 10 == 0 || l.iteration == 1 {
            progress.line(&format!(
                "meta-iteration {}/{}: {status}, {:.2}s",
                l.iteration, cfg.iterations, l.seconds
            ));
        }
        progress.step(l.iteration as u64, &status);
    })?;
    progress.finish();
    let secs = t.elapsed().as_secs_f64();
    store::save(&a.output, &g, &st, &cfg)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"seconds": secs, "history": hist, "groups": st.sites.len()})
            )?
        );
    } else {
        println!(
            "meta-trained {} gated groups in {secs:.1}s; generator: {}",
            st.sites.len(),
            a.output.display()
        );
    }
    Ok(())
}
