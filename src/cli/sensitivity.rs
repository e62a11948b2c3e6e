//! Prune each dependency group alone at several ratios; table + SVG chart.

use super::choices::CriterionArg;
use super::*;

#[derive(Args)]
pub struct SensitivityArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, value_enum, default_value_t = CriterionArg::L1)]
    method: CriterionArg,
    /// Comma-separated fractions of each group's channels to remove (old name: --ratios).
    #[arg(
        long = "remove-channels",
        alias = "ratios",
        default_value = "0.25,0.5,0.75"
    )]
    ratios: String,
    /// Evaluate on only this many test samples.
    #[arg(long, default_value_t = 1000, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    eval_limit: usize,
    /// Calibration samples from the training split for data-driven criteria (default 512,
    /// at most the split; more than the split holds is an error).
    #[arg(long, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    calib: Option<usize>,
    /// Write the chart here (SVG).
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(a: SensitivityArgs) -> Result<()> {
    let SensitivityArgs {
        model,
        data: d,
        method,
        ratios,
        eval_limit,
        calib,
        output,
        json: j,
        device,
    } = a;
    let dev = device.open()?;
    use lopper::prune;
    let crit = method.criterion();
    let method = super::choices::name(&method);
    let ratios: Vec<f64> = ratios
        .split(',')
        .map(|r| {
            r.trim()
                .parse::<f64>()
                .with_context(|| format!("bad fraction '{r}' in --remove-channels"))
        })
        .collect::<Result<_>>()?;
    if let Some(r) = ratios.iter().find(|r| !(0.0..1.0).contains(*r)) {
        bail!("--remove-channels {r}: a fraction to remove must be in [0, 1)");
    }
    if let Some(o) = &output {
        lopper::util::check_writable(o, "output")?;
    }
    let train_ds = load_split(&d, Split::Train)?;
    let calib = super::calib_size(calib, 512, &train_ds, &d.data)?;
    let test = load_split(&d, Split::Test)?;
    let test = test.sample(eval_limit.min(test.len()), 0)?;
    let g = on_device(
        resolve_model(&model, Some(&train_ds), d.data_dir.as_deref())?,
        &dev,
    )?;
    let train_ds = labels_for_model(train_ds, &d, &g, j)?;
    let test = labels_for_model(test, &d, &g, true)?;
    let groups = prune::dependency_groups(&g)?;
    let stats = if crit.needs_data() {
        Some(prune::collect_stats(
            &g,
            &train_ds.sample(calib, 0)?,
            calib,
            64,
        )?)
    } else {
        None
    };
    let dense = train::evaluate(&g, &test, 500)?.top1;
    let rows = prune::sensitivity(&g, &groups, &test, crit, &ratios, stats.as_ref())?;
    if let Some(o) = &output {
        let series: Vec<lopper::charts::Series> = rows
            .iter()
            .map(|r| lopper::charts::Series {
                name: format!("{} ({})", r.layer, r.width),
                points: std::iter::once((0.0, 100.0 * dense))
                    .chain(
                        r.ratios
                            .iter()
                            .zip(&r.accuracy)
                            .map(|(&x, &y)| (x, 100.0 * y)),
                    )
                    .collect(),
            })
            .collect();
        let palette = lopper::charts::Palette::new(series.iter().map(|s| s.name.as_str()));
        let svg = lopper::charts::line_chart(
            &lopper::charts::LineChart {
                title: &format!("Sensitivity ({method}): {}", model.model),
                x_label: "fraction of the group's channels removed",
                y_label: "top-1 accuracy (%)",
                series: &series,
                reference: Some(("dense", 100.0 * dense)),
                pareto: false,
                integer_x: false,
            },
            &palette,
        )?;
        lopper::util::atomic_write(o, svg.as_bytes())?;
    }
    if j {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"dense": dense, "rows": rows}))?
        );
    } else {
        println!("dense top-1 {}", pct(dense));
        print!("{:<24} {:>6}", "group (first layer)", "width");
        for r in &ratios {
            print!(" {:>8}", format!("-{:.0}%", 100.0 * r));
        }
        println!();
        for r in &rows {
            print!("{:<24} {:>6}", r.layer, r.width);
            for a in &r.accuracy {
                print!(" {:>8}", format!("{:+.2}", 100.0 * (a - dense)));
            }
            println!();
        }
    }
    Ok(())
}
