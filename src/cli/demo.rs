//! `lopper demo`: the main job on the embedded 8x8 digits, no setup needed.

use super::*;
use lopper::train::{TrainConfig, TrainOpts};

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 30, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    epochs: usize,
    /// Print results as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DemoArgs) -> Result<()> {
    cmd_demo(a.epochs, a.json)
}

fn cmd_demo(epochs: usize, json_out: bool) -> Result<()> {
    let tr = data::load("digits", Split::Train, None)?;
    let te = data::load("digits", Split::Test, None)?;
    let g = zoo::build("resnet8@1x8x8#10", 0)?;
    let c = cost::cost(&g)?;
    if !json_out {
        println!(
            "lopper demo: ResNet-8 on the embedded 8x8 digits ({} train / {} test images)\n",
            tr.len(),
            te.len()
        );
        print!("{}", c.table());
        println!();
    }
    let before = train::evaluate(&g, &te, 500)?;
    let cfg = TrainConfig {
        epochs,
        batch_size: 64,
        lr: 0.05,
        weight_decay: 5e-4,
        crop_pad: 1,
        ..Default::default()
    };
    let t = Instant::now();
    let console = super::progress::Console::new(json_out);
    let res = train::train(
        &g,
        &tr,
        &cfg,
        &TrainOpts {
            progress: Some(&console),
            test: Some(&te),
            ..Default::default()
        },
    )?;
    let after = train::evaluate(&g, &te, 500)?;
    let secs = t.elapsed().as_secs_f64();
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": "resnet8@1x8x8", "data": "digits", "params": c.total_params, "macs": c.total_macs,
                "before": before, "after": after, "seconds": secs, "history": res.history,
            }))?
        );
    } else {
        println!(
            "\nsummary: test accuracy {} -> {} after {} epochs in {:.1}s; {} params, {} MACs per image",
            pct(before.top1),
            pct(after.top1),
            epochs,
            secs,
            cost::human(c.total_params),
            cost::human(c.total_macs)
        );
    }
    Ok(())
}
