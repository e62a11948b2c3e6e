//! The i-SpaSP synthetic decay experiment (spec §8, §11.3; the official README figure):
//! residual ‖V‖²_F of the pruned two-layer module against the kept width s, for hidden
//! representations of decreasing compressibility p, against random subsets and plain
//! activation-L1. Writes `docs/results/ispasp_synthetic.{svg,md}`.
//!
//! `cargo run --release --example ispasp_synthetic`

use lopper::charts::{line_chart, LineChart, Palette, Series};
use lopper::methods::ispasp::synthetic::decay_experiment;
use std::fmt::Write;

fn main() -> anyhow::Result<()> {
    let ps = [0.3, 0.5, 0.7, 0.9];
    let mut md = String::from(
        "# i-SpaSP synthetic decay (B = 64, C = 10, T = 20, seed 0)\n\n\
         Residual ‖V‖²_F after pruning the hidden layer to s units; random = mean of 5 random subsets.\n\n",
    );
    let mut series = Vec::new();
    for n in [100usize, 200] {
        let sizes: Vec<usize> = (1..=n / 10)
            .map(|k| k * 10)
            .chain([5])
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let t = std::time::Instant::now();
        let pts = decay_experiment(64, n, 10, &ps, &sizes, 5, 0)?;
        writeln!(md, "## d_hid = {n} ({:.2} s)\n", t.elapsed().as_secs_f64())?;
        writeln!(
            md,
            "| p | s | i-SpaSP | activation-L1 | random |\n|---|---|---|---|---|"
        )?;
        for q in &pts {
            writeln!(
                md,
                "| {} | {} | {:.3e} | {:.3e} | {:.3e} |",
                q.p, q.s, q.ispasp, q.act_l1, q.random
            )?;
        }
        md.push('\n');
        for &p in &ps {
            series.push(Series {
                name: format!("d={n} p={p}"),
                points: pts
                    .iter()
                    .filter(|q| q.p == p)
                    .map(|q| (q.s as f64 / n as f64, q.ispasp.max(1e-16).log10()))
                    .collect(),
            });
        }
    }
    let palette = Palette::new(series.iter().map(|s| s.name.as_str()));
    let svg = line_chart(
        &LineChart {
            title: "i-SpaSP: pruning error vs kept width (synthetic)",
            x_label: "kept fraction s / d_hid",
            y_label: "log10 residual ||V||^2",
            series: &series,
            reference: None,
            pareto: false,
            integer_x: false,
        },
        &palette,
    )?;
    std::fs::create_dir_all("docs/results")?;
    lopper::util::atomic_write("docs/results/ispasp_synthetic.svg".as_ref(), svg.as_bytes())?;
    lopper::util::atomic_write("docs/results/ispasp_synthetic.md".as_ref(), md.as_bytes())?;
    print!("{md}");
    Ok(())
}
