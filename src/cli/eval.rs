//! Evaluate a model on a dataset's test split.

use super::*;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Inference batch (no effect on the result, only on speed and memory).
    #[arg(long, default_value_t = 500, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    batch_size: usize,
    /// Evaluate on only this many test samples (a seeded subset, as in prune and sparsify).
    #[arg(long, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    eval_limit: Option<usize>,
    #[arg(long)]
    json: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let EvalArgs {
        model,
        data: d,
        batch_size,
        eval_limit,
        json: j,
        device,
    } = a;
    let dev = device.open()?;
    let mut ds = load_split(&d, Split::Test)?;
    if let Some(n) = eval_limit {
        ds = ds.sample(n.min(ds.len()), 0)?;
    }
    let g = on_device(
        resolve_model(&model, Some(&ds), d.data_dir.as_deref())?,
        &dev,
    )?;
    let ds = labels_for_model(ds, &d, &g, j)?;
    let t = Instant::now();
    let ev = train::evaluate(&g, &ds, batch_size)?;
    if let Some(w) = ev.warning() {
        eprintln!("warning: {w}");
    }
    let secs = t.elapsed().as_secs_f64();
    if j {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"model": model.model, "data": d.data, "result": ev, "seconds": secs})
            )?
        );
    } else {
        println!(
            "{} on {} test: top-1 {} ({}/{}), top-5 {}, loss {:.4}, {:.1}s",
            model.model,
            d.data,
            pct(ev.top1),
            ev.correct,
            ev.n,
            pct(ev.top5),
            ev.loss,
            secs
        );
    }
    Ok(())
}
