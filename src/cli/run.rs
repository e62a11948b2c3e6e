//! Run a TOML recipe (data, dense model, methods × budgets × seeds), resuming from
//! finished steps; writes report.json and a self-contained report.html.

use super::*;

#[derive(Args)]
pub struct RunArgs {
    recipe: PathBuf,
    /// Output directory (default runs/<recipe name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Data directory passed to every step (default: $LOPPER_DATA or ../shared/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    /// Device every step's model runs on (cpu, cuda, cuda:N), passed to each step.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: RunArgs) -> Result<()> {
    let RunArgs {
        recipe,
        out,
        data_dir,
        json: j,
        device,
    } = a;
    // Fail before the first step if the device cannot be opened.
    lopper::device::open(&device)?;
    let r = lopper::recipe::load(&recipe)?;
    let out = match out {
        Some(o) => o,
        None => lopper::recipe::run::default_out(&r)?,
    };
    let opts = lopper::recipe::run::RunOpts {
        out: out.clone(),
        exe: std::env::current_exe()?,
        data_dir,
        device: (device != "cpu").then_some(device),
    };
    let rep = lopper::recipe::run::run(&r, &opts, &super::progress::Console::new())?;
    if j {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "{}: {} steps ({} run, {} cached) in {:.0}s; report: {}",
            r.name,
            rep.steps.len(),
            rep.ran.len(),
            rep.steps.len() - rep.ran.len(),
            rep.seconds,
            out.join("report.html").display()
        );
        print_table(&rep);
    }
    Ok(())
}

/// The results as a table: one row per step, the dense model first. MACs and params are
/// kept fractions (for sparse models MACs count the non-zero weights); top-1 is shown right
/// after the method and after fine-tuning; latency is measured on this machine in lopper's
/// runtime.
pub(super) fn print_table(rep: &lopper::recipe::report::RunReport) {
    let dense = rep.dense.result.top1;
    let dense_latency = rep
        .dense_measured()
        .map(|d| (d.latency_b1_ms, d.latency_b64_ms));
    let head = [
        "method",
        "MACs",
        "params",
        "zeros",
        "top-1 cut",
        "top-1",
        "Δ top-1",
        "b1/b64 ms",
        "wall s",
    ];
    let row = |c: [String; 9]| {
        println!(
            "  {:<22} {:>7} {:>7} {:>7} {:>9} {:>7} {:>7} {:>13} {:>7}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
        )
    };
    println!();
    row(head.map(String::from));
    let lat =
        |l: Option<(f64, f64)>| l.map_or("—".to_string(), |(a, b)| format!("{a:.2} / {b:.1}"));
    let dash = || "—".to_string();
    row([
        "dense".into(),
        "100.0%".into(),
        "100.0%".into(),
        dash(),
        dash(),
        pct(dense),
        String::new(),
        lat(dense_latency),
        String::new(),
    ]);
    for s in &rep.steps {
        let r = &s.report;
        let acc = r.accuracy();
        row([
            s.step.id.trim_end_matches("-s0").to_string(),
            pct(r.macs_fraction()),
            pct(r.params_fraction()),
            r.sparsity().map_or_else(dash, pct),
            r.top1_before_finetune
                .filter(|_| r.seconds.finetune > 0.0)
                .map_or_else(dash, pct),
            acc.map_or_else(dash, pct),
            acc.map_or_else(dash, |a| format!("{:+.2}", 100.0 * (a - dense))),
            lat(Some(r.latency_ms())),
            format!("{:.1}", s.seconds),
        ]);
    }
}
