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
        for s in &rep.steps {
            println!(
                "  {:<36} top-1 {:>7}  MACs {:>7}",
                s.step.id,
                s.report.accuracy().map_or("—".into(), pct),
                pct(s.report.macs_fraction())
            );
        }
    }
    Ok(())
}
