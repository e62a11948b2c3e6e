//! The self-contained HTML report of a recipe run: inline SVG charts and tables, no
//! scripts, no external resources, so it renders offline in any browser.

use super::report::{RunReport, StepKind};
use crate::svg::{bar_chart, esc, line_chart, Series};
use std::collections::BTreeMap;

pub fn render(r: &RunReport) -> String {
    [
        header(r),
        results_table(r),
        cost_charts(r),
        wall_chart(r),
        layer_charts(r),
        training_curves(r),
        recipe_section(r),
    ]
    .concat()
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

/// One row per step.
fn results_table(r: &RunReport) -> String {
    let dense_acc = r.dense.result.top1;
    let mut h = String::new();
    h += "<h2>Results</h2>\n<table><tr><th>method</th><th>budget</th><th>seed</th><th>top-1 %</th><th>Δ vs dense</th><th>MACs (of dense)</th><th>sparsity</th><th>latency b1 / b64 ms</th><th>wall s</th></tr>\n";
    for s in &r.steps {
        let rep = &s.report;
        let acc = rep.accuracy();
        let (b1, b64) = rep.latency_ms();
        let macs = 100.0 * rep.macs_fraction();
        h += &format!(
            "<tr><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td><td>{}</td><td>{macs:.1} %</td><td>{}</td><td>{b1:.2} / {b64:.1}</td><td>{:.1}</td></tr>\n",
            esc(&s.step.label),
            match s.step.kind {
                StepKind::Sparsify => "sparsity",
                StepKind::Prune => "MACs ≤",
            },
            s.step.budget,
            s.step.seed,
            acc.map_or("—".into(), |a| format!("{:.2}", 100.0 * a)),
            acc.map_or("—".into(), |a| format!("{:+.2}", 100.0 * (a - dense_acc))),
            rep.sparsity()
                .map_or("—".into(), |v| format!("{:.1} %", 100.0 * v)),
            s.seconds
        );
    }
    h += "</table>\n";
    h
}

/// Accuracy against cost, one series per method label: structured methods against MACs, post-training sparsity against its sparsity (two charts, since the x axes mean different things).
fn cost_charts(r: &RunReport) -> String {
    let dense_acc = r.dense.result.top1;
    let mut h = String::new();
    let mut by_macs: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut by_sp: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in &r.steps {
        let Some(a) = s.report.accuracy() else {
            continue;
        };
        if s.step.kind == StepKind::Prune {
            let m = s.report.macs_fraction();
            by_macs
                .entry(s.step.label.clone())
                .or_default()
                .push((100.0 * m, 100.0 * a));
        } else {
            by_sp
                .entry(s.step.label.clone())
                .or_default()
                .push((100.0 * s.step.budget, 100.0 * a));
        }
    }
    let series = |m: BTreeMap<String, Vec<(f64, f64)>>, dense_x: f64| -> Vec<Series> {
        let mut v: Vec<Series> = m
            .into_iter()
            .map(|(name, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series { name, points }
            })
            .collect();
        if dense_acc.is_finite() {
            v.push(Series {
                name: "dense".into(),
                points: vec![(dense_x, 100.0 * dense_acc)],
            });
        }
        v
    };
    h += "<h2>Accuracy vs cost</h2>\n";
    if !by_macs.is_empty() {
        h += &line_chart(
            "Structured pruning: top-1 vs MACs",
            "MACs, % of dense",
            "top-1 %",
            &series(by_macs, 100.0),
        );
    }
    if !by_sp.is_empty() {
        h += &line_chart(
            "Post-training sparsity: top-1 vs sparsity",
            "sparsity %",
            "top-1 %",
            &series(by_sp, 0.0),
        );
    }
    h
}

/// Wall time per method (all its steps).
fn wall_chart(r: &RunReport) -> String {
    let mut h = String::new();
    let mut wall: BTreeMap<String, f64> = BTreeMap::new();
    for s in &r.steps {
        *wall.entry(s.step.label.clone()).or_default() += s.seconds;
    }
    h += "<h2>Wall time</h2>\n";
    h += &bar_chart(
        "Wall time per method (all its steps)",
        "seconds",
        &wall.into_iter().collect::<Vec<_>>(),
    );
    h
}

/// Per-layer widths (structured) or zero fractions (sparse) of each step.
fn layer_charts(r: &RunReport) -> String {
    let mut h = String::new();
    h += "<h2>Per-layer structure</h2>\n";
    for s in &r.steps {
        let bars = s.report.layer_bars();
        if bars.is_empty() {
            continue;
        }
        let what = match s.step.kind {
            StepKind::Sparsify => "zero weights, % per layer",
            StepKind::Prune => "kept width, % of dense",
        };
        h += &bar_chart(&format!("{} — {}", s.step.id, what), what, &bars);
    }
    h
}

/// Training curves where the step has them (UniPTS sparse training).
fn training_curves(r: &RunReport) -> String {
    let mut h = String::new();
    let mut curves = Vec::new();
    for s in &r.steps {
        let pts = s.report.loss_curve();
        if !pts.is_empty() {
            curves.push(Series {
                name: s.step.id.clone(),
                points: pts,
            });
        }
    }
    if !curves.is_empty() {
        h += "<h2>Training curves</h2>\n";
        h += &line_chart(
            "Sparse training: KL to the dense teacher per epoch",
            "epoch",
            "KL",
            &curves,
        );
    }
    h
}

/// The recipe as run, for reproduction.
fn recipe_section(r: &RunReport) -> String {
    let mut h = String::new();
    h += "<h2>Recipe</h2>\n<pre>";
    h += &esc(&serde_json::to_string_pretty(&r.recipe).unwrap_or_default());
    h += "</pre>\n</body></html>\n";
    h
}
