//! Minimal self-contained SVG charts (no dependencies, no network): line charts for
//! sensitivity curves, accuracy-vs-cost plots and training curves.

/// One named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const PALETTE: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// Escapes text for SVG/HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart with axes, ticks, and a legend.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 440.0);
    let (l, r, t, b) = (70.0, 190.0, 40.0, 55.0);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if (x1 - x0).abs() < 1e-12 {
        x1 = x0 + 1.0;
    }
    if (y1 - y0).abs() < 1e-12 {
        y1 = y0 + 1.0;
    }
    let pad = 0.05 * (y1 - y0);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| h - b - (y - y0) / (y1 - y0) * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        (w - r + l) / 2.0,
        esc(title)
    );
    s += &format!(
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - b,
        w - r,
        h - b
    );
    s += &format!(
        "<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - b
    );
    for i in 0..=5 {
        let xv = x0 + (x1 - x0) * i as f64 / 5.0;
        let yv = y0 + (y1 - y0) * i as f64 / 5.0;
        s += &format!("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"#ddd\"/><text x=\"{0}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>\n", px(xv), t, h - b, h - b + 16.0, fmt_tick(xv));
        s += &format!("<line x1=\"{l}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3}\" text-anchor=\"end\">{4}</text>\n", py(yv), w - r, l - 6.0, py(yv) + 4.0, fmt_tick(yv));
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
        (w - r + l) / 2.0,
        h - 12.0,
        esc(x_label)
    );
    s += &format!("<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>\n", (h - b + t) / 2.0, (h - b + t) / 2.0, esc(y_label));
    for (i, se) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = se
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        );
        for &(x, y) in &se.points {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n",
                px(x),
                py(y)
            );
        }
        let ly = t + 14.0 * i as f64 + 6.0;
        s += &format!("<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\">{}</text>\n", w - r + 12.0, ly - 4.0, w - r + 30.0, ly + 1.0, esc(&se.name));
    }
    s + "</svg>\n"
}

/// A horizontal bar chart of labelled values (wall times, per-layer sparsities).
pub fn bar_chart(title: &str, x_label: &str, bars: &[(String, f64)]) -> String {
    let row = 18.0;
    let (l, r, t, b) = (230.0, 60.0, 40.0, 40.0);
    let w = 760.0;
    let h = t + b + row * bars.len().max(1) as f64;
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-12);
    let px = |v: f64| l + v / max * (w - l - r);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        esc(title)
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = t + row * i as f64;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><rect x=\"{l}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{}</text>\n",
            l - 6.0,
            y + 13.0,
            esc(name),
            y + 3.0,
            (px(*v) - l).max(0.5),
            row - 5.0,
            PALETTE[0],
            px(*v) + 4.0,
            y + 13.0,
            fmt_tick(*v)
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
        (w + l - r) / 2.0,
        h - 12.0,
        esc(x_label)
    );
    s + "</svg>\n"
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_well_formed() {
        let s = line_chart(
            "t <1>",
            "x",
            "y",
            &[Series {
                name: "a&b".into(),
                points: vec![(0.0, 1.0), (1.0, 2.0)],
            }],
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("t &lt;1&gt;") && s.contains("a&amp;b") && s.contains("<polyline"));
    }
}
