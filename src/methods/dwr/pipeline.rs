//! The DWR pipeline (spec §3, §6.3, §7): collect (d, w, r, accuracy) points by iterative
//! pruning + short fine-tuning along each axis (cached on disk), fit the predictor, solve
//! under the budget, snap to a realisable configuration checked with the exact cost model,
//! and build it from the dense model (depth, then width, then resolution).

use super::map::{fit_auto, Map, Point};
use super::ops::{prunable_channels, prune_depth, prune_resolution, prune_width, DepthOrder};
use super::solve::{maximise, Optimum};
use crate::graph::cost::cost;
use crate::graph::Graph;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DwrConfig {
    /// Lower bounds of (d, w, r): never extrapolate far below the data.
    pub lo: [f64; 3],
    /// Width decrement per collection step.
    pub width_step: f64,
    /// Resolution decrement per step, in pixels (CIFAR: 4).
    pub res_step: usize,
    /// Fine-tuning epochs after each collection step.
    pub ft_epochs: usize,
    pub seed: u64,
}

impl Default for DwrConfig {
    fn default() -> Self {
        DwrConfig {
            lo: [0.3; 3],
            width_step: 0.1,
            res_step: 4,
            ft_epochs: 1,
            seed: 0,
        }
    }
}

/// A configuration: blocks removed (in depth order), width fraction, input size.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub blocks_removed: usize,
    pub width: f64,
    pub px: usize,
}

/// One collected point with the exact configuration behind it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Collected {
    pub axis: String,
    pub point: Point,
    pub config: Config,
    pub macs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Cache {
    key: String,
    points: Vec<Collected>,
}

/// The dense input size: square images only; `None` for models without an image input
/// (token sequences, flat vectors), which DWR prunes along depth and width alone.
pub fn base_px(g: &Graph) -> Result<Option<usize>> {
    match g.input_shape()[..] {
        [_, h, w] if h == w => Ok(Some(h)),
        [_, _, _] => bail!(
            "DWR needs a square image input, the model takes {:?}",
            g.input_shape()
        ),
        _ => Ok(None),
    }
}

/// The search bounds for `g`: the resolution axis is pinned at 1 for a model without an
/// image input.
pub fn bounds(g: &Graph, lo: [f64; 3]) -> Result<[f64; 3]> {
    Ok(match base_px(g)? {
        Some(_) => lo,
        None => [lo[0], lo[1], 1.0],
    })
}

/// The dense input size, 1 standing in for models without an image input (their
/// resolution never changes: [`bounds`]).
fn r_base(g: &Graph) -> Result<usize> {
    Ok(base_px(g)?.unwrap_or(1))
}

/// Depth, then width, then resolution, from the dense model.
pub fn build(g: &Graph, order: &DepthOrder, c: Config) -> Result<Graph> {
    let d = prune_depth(g, order, c.blocks_removed)?;
    let w = prune_width(&d, c.width)?;
    prune_resolution(&w, c.px)
}

/// Collects the axis points; `train(g, seed)` fine-tunes in place, `eval(g)` returns the
/// validation accuracy. With `cache`, a previous run with the same model and settings is
/// reused and each finished axis is saved as it completes.
pub fn collect(
    g: &Graph,
    order: &DepthOrder,
    cfg: &DwrConfig,
    cache: Option<&Path>,
    train: &mut dyn FnMut(&Graph, u64) -> Result<()>,
    eval: &dyn Fn(&Graph) -> Result<f64>,
) -> Result<Vec<Collected>> {
    let dense_cost = cost(g)?;
    let key = format!(
        "{} MACs {} params {} nodes {:?} order {:?}",
        dense_cost.total_macs,
        dense_cost.total_params,
        g.nodes.len(),
        cfg,
        order.adds
    );
    let mut points = load_cache(cache, &key)?;
    let save = |points: &Vec<Collected>| -> Result<()> {
        if let Some(p) = cache {
            let c = Cache {
                key: key.clone(),
                points: points.clone(),
            };
            crate::util::atomic_write(p, serde_json::to_string_pretty(&c)?.as_bytes())?;
        }
        Ok(())
    };
    let r0 = r_base(g)?;
    let lo = bounds(g, cfg.lo)?;
    let cfg = &DwrConfig { lo, ..cfg.clone() };
    let c0 = prunable_channels(g)? as f64;
    let dense_cfg = Config {
        blocks_removed: 0,
        width: 1.0,
        px: r0,
    };
    if points.is_empty() {
        let a0 = eval(g)?;
        points.push(Collected {
            axis: "dense".into(),
            point: Point {
                d: 1.0,
                w: 1.0,
                r: 1.0,
                acc: a0,
            },
            config: dense_cfg,
            macs: dense_cost.total_macs,
        });
        save(&points)?;
    }
    let a0 = points[0].point.acc;
    for axis in ["depth", "width", "resolution"] {
        if points.iter().any(|p| p.axis == axis) {
            continue; // finished in an earlier run
        }
        let mut cur = g.deep_clone()?;
        let mut c = dense_cfg;
        let mut step = 0u64;
        loop {
            step += 1;
            let ctx = AxisStep { order, cfg, r0, c0 };
            let Some((next, nc)) = ctx.next(axis, &cur, c, step)? else {
                break;
            };
            cur = next;
            c = nc;
            train(&cur, cfg.seed + step)?;
            let acc = eval(&cur)?;
            let point = Point {
                d: (order.total_blocks - c.blocks_removed) as f64 / order.total_blocks as f64,
                // Width is measured (rounding per group) on the width axis only: removing
                // blocks also removes their channels but leaves the width unchanged.
                w: if axis == "width" {
                    prunable_channels(&cur)? as f64 / c0
                } else {
                    c.width
                },
                r: c.px as f64 / r0 as f64,
                acc,
            };
            points.push(Collected {
                axis: axis.into(),
                point,
                config: c,
                macs: cost(&cur)?.total_macs,
            });
            if acc < 0.5 * a0 {
                break;
            }
        }
        save(&points)?;
    }
    Ok(points)
}

/// The points of an earlier run with the same `key` (model and settings), else none.
fn load_cache(cache: Option<&Path>, key: &str) -> Result<Vec<Collected>> {
    if let Some(p) = cache.filter(|p| p.exists()) {
        let c: Cache = serde_json::from_slice(&std::fs::read(p)?)
            .with_context(|| format!("reading the DWR cache {}", p.display()))?;
        if c.key == key {
            return Ok(c.points);
        }
    }
    Ok(Vec::new())
}

/// What stepping along one axis needs: the depth order, the grid settings and the dense
/// input size and prunable width.
struct AxisStep<'a> {
    order: &'a DepthOrder,
    cfg: &'a DwrConfig,
    r0: usize,
    c0: f64,
}

impl AxisStep<'_> {
    /// The model one step further along `axis` from `cur` (at config `c`), or `None`
    /// once the axis reaches its lower bound. Steps are iterative: each starts from the
    /// fine-tuned previous point.
    fn next(
        &self,
        axis: &str,
        cur: &Graph,
        c: Config,
        step: u64,
    ) -> Result<Option<(Graph, Config)>> {
        let (order, cfg, r0) = (self.order, self.cfg, self.r0);
        Ok(Some(match axis {
            "depth" => {
                if c.blocks_removed >= order.adds.len() {
                    return Ok(None);
                }
                let n = c.blocks_removed + 1;
                let d = (order.total_blocks - n) as f64 / order.total_blocks as f64;
                if d < cfg.lo[0] - 1e-9 {
                    return Ok(None);
                }
                let name = &order.adds[c.blocks_removed];
                let id = cur.node_id(name).context("block vanished")?;
                (
                    crate::prune::remove_blocks(cur, &[id])?,
                    Config {
                        blocks_removed: n,
                        ..c
                    },
                )
            }
            "width" => {
                let target = 1.0 - cfg.width_step * step as f64;
                if target < cfg.lo[1] - 1e-9 {
                    return Ok(None);
                }
                let now = prunable_channels(cur)? as f64 / self.c0;
                (
                    prune_width(cur, target / now)?,
                    Config { width: target, ..c },
                )
            }
            _ => {
                let px = r0.saturating_sub(cfg.res_step * step as usize);
                if (px as f64) < cfg.lo[2] * r0 as f64 - 1e-9 || px == 0 {
                    return Ok(None);
                }
                (prune_resolution(cur, px)?, Config { px, ..c })
            }
        }))
    }
}

/// The best realisable configuration: `blocks_removed` along the depth order, width in
/// steps of 1/64, input size in multiples of `px_step`, exact MACs ≤ `t` × dense. `axes`
/// restricts which dimensions may change (single-dimension baselines).
pub fn snap(
    g: &Graph,
    order: &DepthOrder,
    map: &Map,
    t: f64,
    lo: [f64; 3],
    px_step: usize,
    axes: [bool; 3],
) -> Result<(Config, u64, f64)> {
    let dense = cost(g)?.total_macs as f64;
    let r0 = r_base(g)?;
    let lo = bounds(g, lo)?;
    let mut best: Option<(f64, u64, Config)> = None;
    let max_n = if axes[0] { order.adds.len() } else { 0 };
    for n in 0..=max_n {
        let d = (order.total_blocks - n) as f64 / order.total_blocks as f64;
        if d < lo[0] - 1e-9 {
            break;
        }
        let gd = prune_depth(g, order, n)?;
        let cd = prunable_channels(&gd)? as f64;
        let widths: Vec<usize> = if axes[1] {
            ((lo[1] * 64.0).ceil() as usize..=64).collect()
        } else {
            vec![64]
        };
        for k in widths {
            let gw = prune_width(&gd, k as f64 / 64.0)?;
            let w = prunable_channels(&gw)? as f64 / cd;
            let mut px = r0;
            loop {
                let gr = prune_resolution(&gw, px)?;
                let macs = cost(&gr)?.total_macs;
                if macs as f64 <= t * dense {
                    let f = map.eval(d, w, px as f64 / r0 as f64);
                    let better = match best {
                        None => true,
                        Some((bf, bm, _)) => f > bf + 1e-12 || (f > bf - 1e-12 && macs < bm),
                    };
                    if better {
                        let c = Config {
                            blocks_removed: n,
                            width: k as f64 / 64.0,
                            px,
                        };
                        best = Some((f, macs, c));
                    }
                    break; // larger inputs at this (d, w) were over budget; smaller score lower
                }
                if !axes[2] || px < px_step || ((px - px_step) as f64) < lo[2] * r0 as f64 - 1e-9 {
                    break;
                }
                px -= px_step;
            }
        }
    }
    match best {
        Some((f, macs, c)) => Ok((c, macs, f)),
        None => bail!(
            "no configuration within the bounds {lo:?} reaches {:.1}% of the dense MACs along the allowed axes",
            t * 100.0
        ),
    }
}

/// Fit + solve + snap, from collected points.
pub struct Solution {
    pub map: Map,
    pub loo: Vec<(usize, f64)>,
    pub optimum: Optimum,
    pub config: Config,
    pub macs: u64,
    pub predicted: f64,
}

pub fn solve(
    g: &Graph,
    order: &DepthOrder,
    points: &[Collected],
    cfg: &DwrConfig,
    t: f64,
) -> Result<Solution> {
    let pts: Vec<Point> = points.iter().map(|c| c.point).collect();
    let lo = bounds(g, cfg.lo)?;
    let (map, loo) = fit_auto(&pts, lo)?;
    let optimum = maximise(&map, t, lo)?;
    let (config, macs, predicted) = snap(g, order, &map, t, cfg.lo, cfg.res_step, [true; 3])?;
    Ok(Solution {
        map,
        loo,
        optimum,
        config,
        macs,
        predicted,
    })
}
