//! Time the reference workloads (median of N steps after warm-up, peak RSS).

use super::*;

#[derive(Args)]
pub struct BenchArgs {
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
    } = a;
    lopper::kernels::use_reference_ops(reference);
    if let Some(m) = model {
        return bench_model(&m, batch, train, warmup, steps, reference, j);
    }
    let print = |r: &lopper::bench::BenchRow| {
        if !j {
            println!(
                "{:<22} {:>10.2} {:>10.2} {:>10.2} {:>6} {:>12.0}",
                r.name, r.median_ms, r.min_ms, r.max_ms, r.steps, r.peak_rss_mb
            );
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
fn bench_model(
    m: &str,
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
    let g = resolve_model(&args, None, None)?;
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
