//! Charts for reports, drawn by `plotters` into SVG strings (text stays SVG `<text>`, so no
//! font files are needed and the report stays one self-contained HTML file). What the
//! plotting library does not decide is decided here, once, for every chart: axes fitted to
//! the data with round ticks, one colour per name in every chart of a report
//! ([`Palette`]), a reference line (the dense model), the Pareto front of a cost/accuracy
//! plot, and integer ticks for epoch axes.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;

/// One named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Ten distinguishable colours (the Tableau palette), assigned to names in a fixed order.
const COLOURS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// One colour per name, the same in every chart that uses this palette.
pub struct Palette(BTreeMap<String, RGBColor>);

impl Palette {
    /// Colours assigned in the order the names are given (duplicates ignored).
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Palette {
        let mut m = BTreeMap::new();
        for n in names {
            let k = m.len();
            m.entry(n.to_string()).or_insert_with(|| {
                let (r, g, b) = COLOURS[k % COLOURS.len()];
                RGBColor(r, g, b)
            });
        }
        Palette(m)
    }

    fn get(&self, name: &str) -> RGBColor {
        self.0.get(name).copied().unwrap_or(RGBColor(0, 0, 0))
    }
}

/// A line chart's content and options.
pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    /// A horizontal reference line with its legend name (the dense model's accuracy).
    pub reference: Option<(&'a str, f64)>,
    /// Highlight the Pareto front: points no other point beats on both axes, for a lower
    /// x (cost) and a higher y (accuracy) being better.
    pub pareto: bool,
    /// Integer ticks on the x axis (epochs).
    pub integer_x: bool,
}

/// Escapes text for SVG/HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Tick labels for an axis spanning `span`: as many decimals as ticks about `span / 8`
/// apart need to differ, trailing zeros dropped (26.4, not 26.400000000000002; 49.35 and
/// 49.4, not 49.3 twice).
fn ticker(span: f64) -> impl Fn(&f64) -> String {
    let step = (span / 8.0).abs().max(1e-12);
    let decimals = (-step.log10()).ceil().clamp(0.0, 6.0) as usize;
    move |v: &f64| tick(*v, decimals)
}

/// `v` with at most `decimals` decimals, trailing zeros dropped.
fn tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

/// The data's range, padded by 6 % on each side (a single value gets a unit range).
fn fit(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    let span = if hi - lo < 1e-9 {
        lo.abs().max(1.0) * 0.05
    } else {
        hi - lo
    };
    (lo - 0.06 * span, hi + 0.06 * span)
}

/// The Pareto front of (cost, accuracy) points: sorted by cost, each strictly more
/// accurate than every cheaper one.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for q in p {
        if front.last().is_none_or(|l| q.1 > l.1) {
            front.push(q);
        }
    }
    front
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

/// A line chart (each series' points joined in x order, with markers), legend at the
/// right.
pub fn line_chart(c: &LineChart, palette: &Palette) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (plot, legend) = root.split_horizontally(580);
        let xs = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let (x0, x1) = fit(xs);
        let (y0, y1) = fit(ys.chain(c.reference.map(|r| r.1)));
        let (x0, x1) = if c.integer_x {
            (x0.floor().max(0.0), x1.ceil())
        } else {
            (x0, x1)
        };
        let mut chart = ChartBuilder::on(&plot)
            .caption(c.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_err)?;
        let int_ticks = (x1 - x0).round().clamp(1.0, 10.0) as usize + 1;
        let (xt, yt) = (ticker(x1 - x0), ticker(y1 - y0));
        chart
            .configure_mesh()
            .x_desc(c.x_label)
            .y_desc(c.y_label)
            .x_labels(if c.integer_x { int_ticks } else { 8 })
            .y_labels(8)
            .x_label_formatter(&|v| {
                if c.integer_x {
                    if (v - v.round()).abs() < 1e-6 {
                        format!("{}", v.round() as i64)
                    } else {
                        String::new()
                    }
                } else {
                    xt(v)
                }
            })
            .y_label_formatter(&yt)
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.08))
            .draw()
            .map_err(draw_err)?;
        let mut entries: Vec<(String, RGBColor, bool)> = Vec::new();
        if c.pareto {
            let all: Vec<(f64, f64)> = c.series.iter().flat_map(|s| s.points.clone()).collect();
            let front = pareto_front(&all);
            if front.len() > 1 {
                let band = RGBColor(200, 200, 200).stroke_width(9);
                chart
                    .draw_series(LineSeries::new(front, band))
                    .map_err(draw_err)?;
                entries.push(("Pareto front".into(), RGBColor(200, 200, 200), true));
            }
        }
        if let Some((name, y)) = c.reference {
            let grey = RGBColor(90, 90, 90);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x0, y), (x1, y)],
                    6,
                    4,
                    grey.stroke_width(1),
                ))
                .map_err(draw_err)?;
            entries.push((name.to_string(), grey, true));
        }
        for s in c.series {
            let colour = palette.get(&s.name);
            let mut pts = s.points.clone();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(draw_err)?;
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                .map_err(draw_err)?;
            entries.push((s.name.clone(), colour, false));
        }
        draw_legend(&legend, &entries)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// The legend in its own area: a swatch (line or dot) and the name, one per row.
fn draw_legend(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    entries: &[(String, RGBColor, bool)],
) -> Result<()> {
    for (i, (name, colour, line)) in entries.iter().enumerate() {
        let y = 50 + 22 * i as i32;
        if *line {
            area.draw(&PathElement::new(
                vec![(8, y), (30, y)],
                colour.stroke_width(3),
            ))
            .map_err(draw_err)?;
        } else {
            area.draw(&Circle::new((19, y), 4, colour.filled()))
                .map_err(draw_err)?;
        }
        area.draw(&Text::new(name.clone(), (38, y - 7), ("sans-serif", 13)))
            .map_err(draw_err)?;
    }
    Ok(())
}

/// A horizontal bar chart: one bar per (label, value), in the given order; all in the
/// colour of the name `colour`, or (`None`) each in its label's colour.
pub fn bar_chart(
    title: &str,
    x_label: &str,
    bars: &[(String, f64)],
    colour: Option<&str>,
    palette: &Palette,
) -> Result<String> {
    let mut svg = String::new();
    let n = bars.len().max(1);
    let height = (70 + 18 * n).clamp(160, 1400) as u32;
    let label_px = bars
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, 32) as u32
        * 7
        + 14;
    {
        let root = SVGBackend::with_string(&mut svg, (760, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max);
        let x1 = if max > 0.0 { max * 1.08 } else { 1.0 };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(38)
            .y_label_area_size(label_px)
            .build_cartesian_2d(0.0..x1, (0..n).into_segmented())
            .map_err(draw_err)?;
        // plotters counts segments from the bottom: reversed, the first bar is on top.
        let bars: Vec<&(String, f64)> = bars.iter().rev().collect();
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .x_desc(x_label)
            .x_labels(8)
            .x_label_formatter(&ticker(x1))
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .disable_y_mesh()
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.08))
            .draw()
            .map_err(draw_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (label, v))| {
                let fill = palette.get(colour.unwrap_or(label));
                let mut r = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (*v, SegmentValue::Exact(i + 1)),
                    ],
                    fill.filled(),
                );
                r.set_margin(2, 2, 0, 0);
                r
            }))
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_front_keeps_only_undominated_points() {
        let f = pareto_front(&[
            (50.0, 90.0),
            (30.0, 85.0),
            (40.0, 80.0),
            (60.0, 89.0),
            (70.0, 93.0),
        ]);
        assert_eq!(f, vec![(30.0, 85.0), (50.0, 90.0), (70.0, 93.0)]);
    }

    #[test]
    fn ticks_are_round_and_short() {
        let t = ticker(8.0); // ticks 1 apart
        assert_eq!(
            (t(&26.400000000000002), t(&45.0), t(&-0.0)),
            ("26".into(), "45".into(), "0".into())
        );
        let t = ticker(0.4); // ticks 0.05 apart
        assert_eq!(
            (t(&49.35), t(&49.4), t(&26.400000000000002)),
            ("49.35".into(), "49.4".into(), "26.4".into())
        );
        assert_eq!(ticker(800.0)(&150.4), "150");
    }

    #[test]
    fn charts_render_with_one_colour_per_name_and_integer_epochs() {
        let p = Palette::new(["l1", "taylor"]);
        let s = [
            Series {
                name: "l1".into(),
                points: vec![(50.0, 90.0), (70.0, 92.0)],
            },
            Series {
                name: "taylor".into(),
                points: vec![(50.0, 91.0)],
            },
        ];
        let svg = line_chart(
            &LineChart {
                title: "t",
                x_label: "MACs",
                y_label: "top-1",
                series: &s,
                reference: Some(("dense", 93.0)),
                pareto: true,
                integer_x: false,
            },
            &p,
        )
        .unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("Pareto front") && svg.contains("dense"));
        // l1's colour (the first) and taylor's (the second) both appear.
        assert!(svg.contains("#1F77B4") && svg.contains("#FF7F0E"), "{svg}");
        let curve = [Series {
            name: "l1".into(),
            points: (1..=5).map(|e| (e as f64, 1.0 / e as f64)).collect(),
        }];
        let svg = line_chart(
            &LineChart {
                title: "curve",
                x_label: "epoch",
                y_label: "KL",
                series: &curve,
                reference: None,
                pareto: false,
                integer_x: true,
            },
            &p,
        )
        .unwrap();
        assert!(
            !svg.contains(">\n2.5\n<") && !svg.contains(">\n1.5\n<"),
            "fractional epoch tick"
        );
        let bars = bar_chart(
            "w",
            "s",
            &[("a".into(), 1.0), ("b".into(), 2.5)],
            Some("taylor"),
            &p,
        )
        .unwrap();
        assert!(bars.contains("#FF7F0E") && bars.contains(">\na\n<"));
    }
}
