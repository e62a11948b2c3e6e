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
}

pub fn run(a: RunArgs) -> Result<()> {
    let RunArgs {
        recipe,
        out,
        data_dir,
        json: j,
    } = a;
    let r = lopper::recipe::load(&recipe)?;
    let out = match out {
        Some(o) => o,
        None => lopper::recipe::run::default_out(&r)?,
    };
    let opts = lopper::recipe::run::RunOpts {
        out: out.clone(),
        exe: std::env::current_exe()?,
        data_dir,
    };
    let rep = lopper::recipe::run::run(&r, &opts, &super::progress::Console::new(j))?;
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

/// The results as a table: one row per step, the dense model first. MACs are the kept
/// fraction (for sparse models: the MACs of the non-zero weights); latency is measured on
/// this machine in lopper's runtime.
pub(super) fn print_table(rep: &lopper::recipe::report::RunReport) {
    let dense = rep.dense.result.top1;
    let dense_latency = rep.steps.iter().find_map(|s| match &s.report {
        lopper::recipe::report::StepReport::Prune(p) => {
            Some((p.dense.latency_b1_ms, p.dense.latency_b64_ms))
        }
        lopper::recipe::report::StepReport::Sparsify(_) => None,
    });
    println!(
        "\n  {:<22} {:>8} {:>8} {:>8} {:>9} {:>17} {:>7}",
        "method", "top-1", "Δ top-1", "MACs", "zeros", "latency b1/b64 ms", "wall s"
    );
    let lat =
        |l: Option<(f64, f64)>| l.map_or("—".to_string(), |(a, b)| format!("{a:.2} / {b:.1}"));
    println!(
        "  {:<22} {:>8} {:>8} {:>8} {:>9} {:>17} {:>7}",
        "dense",
        pct(dense),
        "",
        "100.0%",
        "—",
        lat(dense_latency),
        ""
    );
    for s in &rep.steps {
        let acc = s.report.accuracy();
        println!(
            "  {:<22} {:>8} {:>8} {:>8} {:>9} {:>17} {:>7.1}",
            s.step.id.trim_end_matches("-s0"),
            acc.map_or("—".into(), pct),
            acc.map_or("—".into(), |a| format!("{:+.2}", 100.0 * (a - dense))),
            pct(s.report.macs_fraction()),
            s.report.sparsity().map_or("—".into(), pct),
            lat(Some(s.report.latency_ms())),
            s.seconds
        );
    }
}
