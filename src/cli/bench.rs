//! Time the reference workloads (median of N steps after warm-up, peak RSS).

use super::*;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long, default_value_t = 30, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    steps: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Only workloads whose name contains this.
    #[arg(long, default_value = "")]
    filter: String,
    /// Use candle's own ops instead of lopper's kernels (for comparison).
    #[arg(long)]
    reference: bool,
    #[arg(long)]
    json: bool,
    /// Time this model (zoo name or .safetensors/.onnx file) instead of the fixed
    /// workloads: inference at `--batch`, or a training step with `--train`.
    #[arg(long)]
    model: Option<String>,
    /// Batch size for `--model`.
    #[arg(long, default_value_t = 1, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    batch: usize,
    /// With `--model`: time a training step (forward, cross-entropy, backward, SGD).
    #[arg(long)]
    train: bool,
    /// After each workload, print where its forward passes spent their time, per op
    /// category (1×1, depthwise and k×k convs apart, sparse apart). Same as
    /// LOPPER_PROFILE=1. Needs --model or --filter (the workloads run in this process).
    #[arg(long)]
    profile: bool,
}

/// Prints the per-op profile gathered since the last call (see `exec::profile`).
fn print_profile(what: &str) {
    let rows = lopper::exec::profile::take();
    let total: f64 = rows.iter().map(|r| r.1.as_secs_f64()).sum();
    if rows.is_empty() || total == 0.0 {
        return;
    }
    println!("  profile of {what} (forward passes, warm-up included):");
    for (cat, t, n) in rows {
        println!(
            "    {:<28} {:>6.1} %  {:>10.2} ms total  {:>7} runs",
            cat,
            100.0 * t.as_secs_f64() / total,
            t.as_secs_f64() * 1e3,
            n
        );
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        steps,
        warmup,
        filter,
        reference,
        json: j,
        model,
        batch,
        train,
        profile,
        device,
    } = a;
    let dev = device.open()?;
    if !dev.is_cpu() && model.is_none() {
        bail!("--device {}: the fixed workloads are CPU workloads; time a model on another device with --model", device.device);
    }
    lopper::kernels::use_reference_ops(reference);
    if profile {
        if model.is_none() && filter.is_empty() {
            bail!("--profile needs --model or --filter (the workloads then run in this process)");
        }
        lopper::exec::profile::enable(true);
    }
    let profile = lopper::exec::profile::enabled();
    if let Some(m) = model {
        bench_model(&m, &dev, batch, train, warmup, steps, reference, j)?;
        if profile && !j {
            print_profile(&m);
        }
        return Ok(());
    }
    let print = |r: &lopper::bench::BenchRow| {
        if !j {
            println!(
                "{:<22} {:>10.2} {:>10.2} {:>10.2} {:>6} {:>12.0}",
                r.name, r.median_ms, r.min_ms, r.max_ms, r.steps, r.peak_rss_mb
            );
            if profile {
                print_profile(&r.name);
            }
        }
    };
    if !j {
        println!(
            "{:<22} {:>10} {:>10} {:>10} {:>6} {:>12}",
            "workload", "median ms", "min ms", "max ms", "steps", "peak RSS MB"
        );
    }
    let rows = if filter.is_empty() {
        // One process per workload, so each peak RSS is that workload's own.
        let exe = std::env::current_exe()?;
        let mut rows = Vec::new();
        for w in lopper::bench::WORKLOADS {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args([
                "bench",
                "--json",
                "--filter",
                w,
                "--steps",
                &steps.to_string(),
                "--warmup",
                &warmup.to_string(),
            ]);
            if reference {
                cmd.arg("--reference");
            }
            let out = cmd
                .output()
                .with_context(|| format!("cannot run {}", exe.display()))?;
            if !out.status.success() {
                bail!("bench {w} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let r: Vec<lopper::bench::BenchRow> = serde_json::from_value(v["rows"].clone())?;
            r.iter().for_each(print);
            rows.extend(r);
        }
        rows
    } else {
        lopper::bench::run(steps, warmup, &filter, print)?
    };
    if j {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "backend": if reference { "candle" } else { "lopper" },
                "threads": rayon::current_num_threads(),
                "rows": rows
            }))?
        );
    }
    Ok(())
}

/// `lopper bench --model`: one row for one model, batch and mode.
#[allow(clippy::too_many_arguments)]
fn bench_model(
    m: &str,
    dev: &candle_core::Device,
    batch: usize,
    train: bool,
    warmup: usize,
    steps: usize,
    reference: bool,
    j: bool,
) -> Result<()> {
    let args = ModelArgs {
        model: m.to_string(),
        weights: None,
        init_seed: 0,
    };
    let g = on_device(resolve_model(&args, None, None)?, dev)?;
    let label = Path::new(m)
        .file_stem()
        .map_or(m.to_string(), |s| s.to_string_lossy().into_owned());
    let o = lopper::bench::model::ModelBench {
        batch,
        train,
        warmup,
        steps,
    };
    let r = lopper::bench::model::time_model(&g, &label, &o)?;
    if j {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "backend": if reference { "candle" } else { "lopper" },
                "threads": rayon::current_num_threads(),
                "rows": [r]
            }))?
        );
    } else {
        println!(
            "{:<28} {:>10.3} ms median ({:.3}..{:.3}, {} steps), peak RSS {:.0} MB",
            r.name, r.median_ms, r.min_ms, r.max_ms, r.steps, r.peak_rss_mb
        );
    }
    Ok(())
}
