//! The self-contained HTML report of a recipe run: inline SVG charts and tables, no
//! scripts, no external resources, so it renders offline in any browser.

use super::report::{RunReport, StepKind};
use crate::charts::{bar_chart, esc, line_chart, LineChart, Palette, Series};
use anyhow::Result;

/// The report page. Every chart colours a method the same way (one [`Palette`] over the
/// recipe's method labels, in recipe order).
pub fn render(r: &RunReport) -> Result<String> {
    let palette = Palette::new(r.steps.iter().map(|s| s.step.label.as_str()));
    Ok([
        header(r),
        results_table(r),
        cost_charts(r, &palette)?,
        wall_chart(r, &palette)?,
        layer_charts(r, &palette)?,
        training_curves(r, &palette)?,
        recipe_section(r),
    ]
    .concat())
}

/// Document head, title and the one-paragraph summary.
fn header(r: &RunReport) -> String {
    let dense_acc = r.dense.result.top1;
    let mut h = String::new();
    h += "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">";
    h += &format!("<title>lopper — {}</title>", esc(&r.recipe.name));
    h += "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}\
          table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
          th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}svg{display:block;margin:1em 0}</style>";
    h += "</head><body>\n";
    h += &format!("<h1>{}</h1>\n", esc(&r.recipe.name));
    h += &format!(
        "<p>Data <b>{}</b>, dense model <b>{}</b>: top-1 <b>{:.2} %</b>{}. {} steps ({} run now, the rest cached), {:.0} s. Machine: {} threads, {}.</p>\n",
        esc(&r.recipe.data.name),
        esc(&r.recipe.model.source),
        100.0 * dense_acc,
        r.dense
            .cost
            .as_ref()
            .map(|c| format!(", {:.2} M MACs", c.macs as f64 / 1e6))
            .unwrap_or_default(),
        r.steps.len(),
        r.ran.len(),
        r.seconds,
        r.machine.threads,
        esc(&r.machine.cpu)
    );
    h
}

/// One row per step, the dense model first. MACs are the structure's for structured
/// methods and those of the non-zero weights for sparsity methods (the cost each reduces),
/// as the header says.
fn results_table(r: &RunReport) -> String {
    let dense_acc = r.dense.result.top1;
    let mut h = String::new();
    h += "<h2>Results</h2>\n<table><tr><th>method</th><th>budget</th><th>seed</th><th>MACs, % of dense (sparsity methods: non-zero weights)</th><th>params, % of dense</th><th>zero weights</th><th>top-1 % after the method</th><th>top-1 %</th><th>Δ vs dense</th><th>latency b1 / b64 ms</th><th>wall s</th></tr>\n";
    if let Some(d) = r.dense_measured() {
        h += &format!(
            "<tr><td>dense</td><td></td><td></td><td>100.0 %</td><td>100.0 %</td><td>—</td><td></td><td>{:.2}</td><td></td><td>{:.2} / {:.1}</td><td></td></tr>\n",
            100.0 * dense_acc,
            d.latency_b1_ms,
            d.latency_b64_ms
        );
    }
    for s in &r.steps {
        let rep = &s.report;
        let acc = rep.accuracy();
        let (b1, b64) = rep.latency_ms();
        let pct = |v: Option<f64>| v.map_or("—".into(), |a| format!("{:.2}", 100.0 * a));
        h += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1} %</td><td>{:.1} %</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{b1:.2} / {b64:.1}</td><td>{:.1}</td></tr>\n",
            esc(&s.step.label),
            esc(&rep.budget),
            s.step.seed,
            100.0 * rep.macs_fraction(),
            100.0 * rep.params_fraction(),
            rep.sparsity()
                .map_or("—".into(), |v| format!("{:.1} %", 100.0 * v)),
            pct(rep.top1_before_finetune.filter(|_| rep.seconds.finetune > 0.0)),
            pct(acc),
            acc.map_or("—".into(), |a| format!("{:+.2}", 100.0 * (a - dense_acc))),
            s.seconds
        );
    }
    h += "</table>\n";
    h
}

/// Accuracy against cost, one series per method label, the dense model as a dashed line and
/// the Pareto front highlighted: structured methods against MACs and against measured
/// latency; post-training sparsity against its sparsity (the x axes mean different things,
/// so they are separate charts).
fn cost_charts(r: &RunReport, palette: &Palette) -> Result<String> {
    let dense = 100.0 * r.dense.result.top1;
    let reference = dense.is_finite().then_some(("dense", dense));
    // Series in recipe order (the legend's order), one per method label.
    let (mut by_macs, mut by_latency, mut by_sp) = (Vec::new(), Vec::new(), Vec::new());
    fn add(v: &mut Vec<Series>, name: &str, p: (f64, f64)) {
        match v.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(p),
            None => v.push(Series {
                name: name.to_string(),
                points: vec![p],
            }),
        }
    }
    for s in &r.steps {
        let Some(a) = s.report.accuracy() else {
            continue;
        };
        let label = s.step.label.clone();
        if s.step.kind == StepKind::Prune {
            let m = s.report.macs_fraction();
            add(&mut by_macs, &label, (100.0 * m, 100.0 * a));
            add(
                &mut by_latency,
                &label,
                (s.report.latency_ms().1, 100.0 * a),
            );
        } else {
            let sp = s.report.sparsity().unwrap_or(s.step.budget);
            add(&mut by_sp, &label, (100.0 * sp, 100.0 * a));
        }
    }
    let mut h = String::from("<h2>Accuracy vs cost</h2>\n");
    let dense_b64 = r.dense_measured().map(|d| d.latency_b64_ms);
    for (title, x_label, m) in [
        (
            "Structured pruning: top-1 vs MACs",
            "MACs, % of dense".to_string(),
            by_macs,
        ),
        (
            "Structured pruning: top-1 vs measured latency",
            format!(
                "latency at batch 64, ms{}",
                dense_b64
                    .map(|d| format!(" (dense {d:.1})"))
                    .unwrap_or_default()
            ),
            by_latency,
        ),
        (
            "Post-training sparsity: top-1 vs sparsity",
            "zero weights, % of conv and linear weights".to_string(),
            by_sp,
        ),
    ] {
        if m.is_empty() {
            continue;
        }
        h += &line_chart(
            &LineChart {
                title,
                x_label: &x_label,
                y_label: "top-1 %",
                series: &m,
                reference,
                pareto: !title.contains("sparsity"),
                integer_x: false,
            },
            palette,
        )?;
    }
    Ok(h)
}

/// Wall time per method (all its steps), in the methods' colours.
fn wall_chart(r: &RunReport, palette: &Palette) -> Result<String> {
    let mut wall: Vec<(String, f64)> = Vec::new();
    for s in &r.steps {
        match wall.iter_mut().find(|(l, _)| *l == s.step.label) {
            Some(w) => w.1 += s.seconds,
            None => wall.push((s.step.label.clone(), s.seconds)),
        }
    }
    Ok(format!(
        "<h2>Wall time</h2>\n{}",
        bar_chart(
            "Wall time per method (all its steps)",
            "seconds",
            &wall,
            None,
            palette
        )?
    ))
}

/// Per-layer widths (structured) or zero fractions (sparse) of each step, in the step's
/// method colour.
fn layer_charts(r: &RunReport, palette: &Palette) -> Result<String> {
    let mut h = String::from("<h2>Per-layer structure</h2>\n");
    for s in &r.steps {
        let bars = s.report.layer_bars();
        if bars.is_empty() {
            continue;
        }
        let what = match s.step.kind {
            StepKind::Sparsify => "zero weights, % per layer",
            StepKind::Prune => "kept width, % of dense",
        };
        h += &bar_chart(
            &format!("{} — {}", s.step.id, what),
            what,
            &bars,
            Some(&s.step.label),
            palette,
        )?;
    }
    Ok(h)
}

/// Training curves where the step has them (UniPTS sparse training), integer epochs.
fn training_curves(r: &RunReport, palette: &Palette) -> Result<String> {
    let mut curves = Vec::new();
    for s in &r.steps {
        let pts = s.report.loss_curve();
        if !pts.is_empty() {
            curves.push(Series {
                name: s.step.label.clone(),
                points: pts,
            });
        }
    }
    if curves.is_empty() {
        return Ok(String::new());
    }
    Ok(format!(
        "<h2>Training curves</h2>\n{}",
        line_chart(
            &LineChart {
                title: "Sparse training: KL divergence to the dense teacher per epoch",
                x_label: "epoch",
                y_label: "KL",
                series: &curves,
                reference: None,
                pareto: false,
                integer_x: true,
            },
            palette,
        )?
    ))
}

/// The recipe as run, for reproduction.
fn recipe_section(r: &RunReport) -> String {
    let mut h = String::new();
    h += "<h2>Recipe</h2>\n<pre>";
    h += &esc(&toml::to_string_pretty(&r.recipe).unwrap_or_default());
    h += "</pre>\n</body></html>\n";
    h
}
