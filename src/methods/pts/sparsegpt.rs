//! SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon
//! weight updates from a calibration set. Per layer, with `H = XᵀX` the Gram matrix of the
//! layer's inputs (a conv's im2col columns, per group), the columns of `W` are pruned left
//! to right in blocks of 128: within a block, the weights with the smallest
//! `w² / [H⁻¹]_jj²` are masked (the block's share of the target, over all its rows; or
//! `n` of every `m` for N:M), and each pruned column's error is spread over the columns
//! not yet visited through the upper Cholesky factor of `H⁻¹`, so the layer's output on the
//! calibration inputs changes as little as possible.
//!
//! Layers are processed in topological order, each from the inputs of the network pruned
//! so far (the sequential form of the paper). Dampening: 1 % of the mean diagonal; inputs
//! that are always zero get a unit diagonal and their weights zeroed (as the reference
//! implementation does). Arithmetic in f64.

use crate::data::Dataset;
use crate::exec::{forward_with, ForwardOpts, Mode};
use crate::graph::ops::Op;
use crate::graph::Graph;
use crate::kernels::gemm::{sgemm, Mat};
use crate::kernels::im2col::im2col;
use crate::kernels::ConvCfg;
use crate::sparse::layers::{weight_host, SparseLayer};
use crate::sparse::mask::Pattern;
use crate::train::fit_input;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Columns per block (the paper's and reference implementation's 128).
const BLOCK: usize = 128;
/// Dampening, as a fraction of the mean of `H`'s diagonal.
const PERCDAMP: f64 = 0.01;

/// Prunes every layer of `g` in place to sparsity `s` (or the N:M pattern) and returns the
/// masks (1 = kept), aligned with `layers`.
pub fn sparsegpt(
    g: &Graph,
    layers: &[SparseLayer],
    data: &Dataset,
    s: f64,
    pattern: Pattern,
) -> Result<Vec<Vec<f32>>> {
    let mut masks = Vec::with_capacity(layers.len());
    for l in layers {
        let (groups, k) = (groups_of(g, l), l.row_len);
        let mut hs = gram(g, l, data, groups)?;
        let w = weight_host(g, l)?;
        let (rows_per_group, mut out, mut mask) =
            (l.rows / groups, vec![0f32; w.len()], vec![0f32; w.len()]);
        for (gi, h) in hs.iter_mut().enumerate() {
            let r0 = gi * rows_per_group;
            let mut wg: Vec<f64> = w[r0 * k..(r0 + rows_per_group) * k]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let m = prune_matrix(&mut wg, rows_per_group, k, h, s, pattern)
                .map_err(|e| e.context(format!("SparseGPT on layer '{}'", l.name)))?;
            for (i, (&v, &keep)) in wg.iter().zip(&m).enumerate() {
                out[r0 * k + i] = v as f32;
                mask[r0 * k + i] = if keep { 1.0 } else { 0.0 };
            }
        }
        g.set_param(
            &l.key,
            &Tensor::from_vec(out, l.shape.as_slice(), &Device::Cpu)?,
        )?;
        masks.push(mask);
    }
    Ok(masks)
}

fn groups_of(g: &Graph, l: &SparseLayer) -> usize {
    match &g.nodes[l.node].op {
        Op::Conv2d(c) => c.groups.max(1),
        _ => 1,
    }
}

/// `H = Σ x xᵀ` (`k × k`, per group) over the layer's inputs on `data`, in the current
/// (partly pruned) network.
fn gram(g: &Graph, l: &SparseLayer, data: &Dataset, groups: usize) -> Result<Vec<Vec<f64>>> {
    let k = l.row_len;
    let input = g.nodes[l.node].inputs[0];
    let mut hs = vec![vec![0f32; k * k]; groups];
    let pos: Vec<usize> = (0..data.len()).collect();
    let mut col = Vec::new();
    for chunk in pos.chunks(64) {
        let (x, _) = data.batch(chunk, None, &Device::Cpu)?;
        let x = fit_input(g, x)?;
        let out = forward_with(
            g,
            &x,
            &ForwardOpts {
                keep: &[input],
                ..ForwardOpts::new(Mode::Eval)
            },
        )?;
        let t = &out.kept[&input];
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        match &g.nodes[l.node].op {
            Op::Conv2d(c) => {
                let cfg = ConvCfg {
                    stride: c.stride,
                    padding: c.padding,
                    dilation: c.dilation,
                    groups: c.groups,
                };
                let geo = cfg.geo(t.dims(), &l.shape)?;
                let (cg, p) = (geo.cg(), geo.p());
                col.resize(k * p, 0.0);
                let img = geo.c * geo.h * geo.w;
                for n in 0..geo.n {
                    for (gi, h) in hs.iter_mut().enumerate() {
                        let xg = &v[n * img + gi * cg * geo.h * geo.w..][..cg * geo.h * geo.w];
                        im2col(&geo, xg, &mut col);
                        // H += col · colᵀ (col is k × p).
                        sgemm(k, k, p, h, Mat::rm(&col, p), Mat::rm_t(&col, p), true, true);
                    }
                }
            }
            _ => {
                let rows = v.len() / k;
                sgemm(
                    k,
                    k,
                    rows,
                    &mut hs[0],
                    Mat::rm_t(&v, k),
                    Mat::rm(&v, k),
                    true,
                    true,
                );
            }
        }
    }
    Ok(hs
        .into_iter()
        .map(|h| h.into_iter().map(|v| v as f64).collect())
        .collect())
}

/// Lower Cholesky factor of the symmetric positive definite `a` (`n × n`), in place.
fn cholesky(a: &mut [f64], n: usize) -> Result<()> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for p in 0..j {
            d -= a[j * n + p] * a[j * n + p];
        }
        if d <= 0.0 || !d.is_finite() {
            bail!("the input Gram matrix is not positive definite at column {j} (pivot {d:e})");
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for p in 0..j {
                v -= a[i * n + p] * a[j * n + p];
            }
            a[i * n + j] = v / d;
        }
        for p in j + 1..n {
            a[j * n + p] = 0.0;
        }
    }
    Ok(())
}

/// The upper factor `U` with `H⁻¹ = Uᵀ U`, from the lower Cholesky factor `L` of `H`:
/// `H⁻¹ = L⁻ᵀ L⁻¹`, whose upper Cholesky factor is taken again.
fn inverse_upper(l: &[f64], n: usize) -> Result<Vec<f64>> {
    // L⁻¹ by forward substitution (lower triangular).
    let mut li = vec![0f64; n * n];
    for c in 0..n {
        li[c * n + c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let mut v = 0.0;
            for p in c..i {
                v -= l[i * n + p] * li[p * n + c];
            }
            li[i * n + c] = v / l[i * n + i];
        }
    }
    // H⁻¹ = L⁻ᵀ L⁻¹: entry (i, j) = Σ_p L⁻¹[p, i]·L⁻¹[p, j], p ≥ max(i, j).
    let mut hinv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut v = 0.0;
            for p in i..n {
                v += li[p * n + i] * li[p * n + j];
            }
            hinv[i * n + j] = v;
            hinv[j * n + i] = v;
        }
    }
    cholesky(&mut hinv, n)?;
    // Upper = transpose of the lower factor.
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = hinv[i * n + j];
        }
    }
    Ok(u)
}

/// SparseGPT on one weight matrix `w` (`rows × k`, updated in place) with Gram matrix `h`
/// (`k × k`, consumed); returns the keep mask.
pub fn prune_matrix(
    w: &mut [f64],
    rows: usize,
    k: usize,
    h: &mut [f64],
    s: f64,
    pattern: Pattern,
) -> Result<Vec<bool>> {
    // Dead inputs: unit diagonal, weights zeroed.
    for j in 0..k {
        if h[j * k + j] == 0.0 {
            h[j * k + j] = 1.0;
            (0..rows).for_each(|r| w[r * k + j] = 0.0);
        }
    }
    let damp = PERCDAMP * (0..k).map(|j| h[j * k + j]).sum::<f64>() / k as f64;
    (0..k).for_each(|j| h[j * k + j] += damp);
    cholesky(h, k)?;
    let u = inverse_upper(h, k)?;
    let mut keep = vec![true; rows * k];
    let mut err = vec![0f64; rows * BLOCK];
    for i1 in (0..k).step_by(BLOCK) {
        let i2 = (i1 + BLOCK).min(k);
        let count = i2 - i1;
        if let Pattern::Unstructured = pattern {
            // The block's share of the target: the smallest w²/U_jj² over all its rows.
            let mut score: Vec<(f64, usize)> = (0..rows)
                .flat_map(|r| (i1..i2).map(move |j| (r, j)))
                .map(|(r, j)| (w[r * k + j].powi(2) / u[j * k + j].powi(2), r * k + j))
                .collect();
            let prune = ((score.len() as f64) * s).floor() as usize;
            if prune > 0 {
                score.select_nth_unstable_by(prune - 1, |a, b| a.0.total_cmp(&b.0));
                score[..prune]
                    .iter()
                    .for_each(|&(_, idx)| keep[idx] = false);
            }
        }
        for i in 0..count {
            let j = i1 + i;
            if let Pattern::NM { n, m } = pattern {
                if i % m == 0 {
                    // In each row, the m - n smallest of columns j..j+m are pruned.
                    for r in 0..rows {
                        let mut sc: Vec<(f64, usize)> = (j..(j + m).min(i2))
                            .map(|c| (w[r * k + c].powi(2) / u[c * k + c].powi(2), c))
                            .collect();
                        sc.sort_by(|a, b| a.0.total_cmp(&b.0));
                        let drop = sc.len().saturating_sub(n);
                        sc[..drop]
                            .iter()
                            .for_each(|&(_, c)| keep[r * k + c] = false);
                    }
                }
            }
            let d = u[j * k + j];
            for r in 0..rows {
                let wv = w[r * k + j];
                let q = if keep[r * k + j] { wv } else { 0.0 };
                let e = (wv - q) / d;
                err[r * BLOCK + i] = e;
                w[r * k + j] = q;
                if e != 0.0 {
                    for c in j + 1..i2 {
                        w[r * k + c] -= e * u[j * k + c];
                    }
                }
            }
        }
        // The block's errors spread over the later columns.
        if i2 < k {
            for r in 0..rows {
                for i in 0..count {
                    let e = err[r * BLOCK + i];
                    if e != 0.0 {
                        let ur = &u[(i1 + i) * k..(i1 + i + 1) * k];
                        for c in i2..k {
                            w[r * k + c] -= e * ur[c];
                        }
                    }
                }
            }
        }
    }
    Ok(keep)
}
