//! Constant folding of the arithmetic that exporters leave around shapes and scales:
//! Sqrt, Erf, Mod, Equal, Where, GatherElements, IsNaN and Expand on constants (PyTorch's TorchScript exporter
//! computes the attention scale as `1 / sqrt(sqrt(head_dim))` and broadcasts the class
//! token through `Equal`/`Where`/`Expand` on the shape). With numpy broadcasting.

use super::view::View;
use super::{Ctx, Value};
use crate::onnx::attrs::Attrs;
use crate::onnx::value::Const;
use anyhow::{anyhow, bail, Result};
use onnx_protobuf::NodeProto;

/// The numpy broadcast of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let at = |d: &[usize], i: usize| (i + d.len()).checked_sub(r).map_or(1, |k| d[k]);
    (0..r)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => bail!("shapes {a:?} and {b:?} do not broadcast ({x} vs {y})"),
        })
        .collect()
}

/// The flat index into a tensor of `dims` of each element of the broadcast `out` shape.
fn sources(dims: &[usize], out: &[usize]) -> Vec<usize> {
    let n: usize = out.iter().product();
    let off = out.len() - dims.len();
    let mut strides = vec![0usize; out.len()];
    let mut s = 1;
    for i in (0..dims.len()).rev() {
        strides[i + off] = if dims[i] == 1 { 0 } else { s };
        s *= dims[i];
    }
    let mut idx = vec![0usize; out.len()];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(idx.iter().zip(&strides).map(|(i, s)| i * s).sum());
        for ax in (0..out.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < out[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    v
}

/// `f` over the broadcast of several constants.
pub(super) fn map_n(cs: &[&Const], f: impl Fn(&[f64]) -> f64) -> Result<Const> {
    let mut dims: Vec<usize> = vec![];
    for c in cs {
        dims = broadcast(&dims, &c.dims)?;
    }
    let src: Vec<Vec<usize>> = cs.iter().map(|c| sources(&c.dims, &dims)).collect();
    let n: usize = dims.iter().product();
    let mut args = vec![0.0; cs.len()];
    let data = (0..n)
        .map(|i| {
            for (k, c) in cs.iter().enumerate() {
                args[k] = c.data[src[k][i]];
            }
            f(&args)
        })
        .collect();
    Ok(Const { dims, data })
}

fn konst<'a>(ctx: &'a Ctx, n: &NodeProto, i: usize) -> Result<&'a Const> {
    let name = &n.input[i];
    ctx.konst(name).ok_or_else(|| {
        anyhow!(
            "{} of a computed tensor ('{name}') is not supported; lopper folds it on constants",
            n.op_type
        )
    })
}

/// The error function (Abramowitz–Stegun 7.1.26 is too coarse for folding; this is the
/// complementary-error continued expansion used by libm, to ~1e-15).
fn erf(x: f64) -> f64 {
    // erf via the series for small |x| and erfc's continued fraction for large.
    let ax = x.abs();
    let v = if ax < 2.5 {
        let (mut term, mut sum, mut k) = (ax, ax, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            k += 1.0;
            term *= -ax * ax / k;
            sum += term / (2.0 * k + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc(x) = exp(-x²)/√π · 1/(x + 1/2/(x + 1/(x + 3/2/(x + …))))
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f)
    };
    v.copysign(x)
}

/// `Sqrt`, `Reciprocal`, `Erf` of a constant (and the RMSNorm parts: see [`super::rms_norm`]).
pub(super) fn unary(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    if let Some(v) = super::rms_norm::unary(ctx, n)? {
        return Ok(v);
    }
    let c = konst(ctx, n, 0)?;
    let f: fn(f64) -> f64 = match n.op_type.as_str() {
        "Sqrt" => f64::sqrt,
        "Reciprocal" => |x| 1.0 / x,
        _ => erf,
    };
    Ok(Value::Const(map_n(&[c], |a| f(a[0]))?))
}

/// `Mod` (integer and `fmod`), `Equal` of constants.
pub(super) fn binary(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["fmod"])?;
    let (x, y) = (konst(ctx, n, 0)?, konst(ctx, n, 1)?);
    let out = match n.op_type.as_str() {
        "Equal" => map_n(&[x, y], |v| f64::from(u8::from(v[0] == v[1])))?,
        _ => {
            let fmod = a.int("fmod", 0) != 0;
            if y.data.contains(&0.0) {
                bail!("Mod by zero");
            }
            map_n(&[x, y], |v| {
                if fmod {
                    v[0] % v[1]
                } else {
                    // Python semantics: the result has the divisor's sign.
                    v[0] - v[1] * (v[0] / v[1]).floor()
                }
            })?
        }
    };
    Ok(Value::Const(out))
}

/// `IsNaN`: of a constant (folded); of a computed tensor, the first half of the NaN guard
/// exporters put after a softmax, `Where(IsNaN(p), 0, p)` (see [`where_op`]).
pub(super) fn is_nan(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    if let Some(c) = ctx.konst(&n.input[0]) {
        return Ok(Value::Const(map_n(&[c], |a| {
            f64::from(u8::from(a[0].is_nan()))
        })?));
    }
    ctx.value(&n.input[0])?;
    Ok(Value::IsNan(n.input[0].clone()))
}

/// `Where(cond, x, y)` of constants; `Where(IsNaN(p), 0, p)` is `p` (lopper's softmax
/// never yields NaN from finite scores).
pub(super) fn where_op(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    if let Some(Value::IsNan(p)) = ctx.values.get(&n.input[0]) {
        let zero = ctx
            .konst(&n.input[1])
            .is_some_and(|c| c.data.iter().all(|&v| v == 0.0));
        if zero && *p == n.input[2] {
            return Ok(ctx.value(p)?.clone());
        }
        bail!("Where on IsNaN is supported as the NaN guard Where(IsNaN(p), 0, p)");
    }
    if ctx.konst(&n.input[0]).is_none() {
        // Where(mask, 0, very negative) of a computed 0/1 mask: an additive attention mask.
        let scalar = |i: usize| {
            ctx.konst(&n.input[i])
                .filter(|c| c.numel() == 1)
                .map(|c| c.data[0])
        };
        let v = ctx.view(&n.input[0]);
        return match (v, scalar(1), scalar(2)) {
            (Some(v), Some(a), Some(b)) if a == 0.0 && b <= -1e4 => Ok(Value::Mask(v)),
            _ => bail!(
                "Where on a computed condition is supported as an attention mask, \
                 Where(mask, 0, -inf)"
            ),
        };
    }
    let (c, x, y) = (konst(ctx, n, 0)?, konst(ctx, n, 1)?, konst(ctx, n, 2)?);
    Ok(Value::Const(map_n(&[c, x, y], |v| {
        if v[0] != 0.0 {
            v[1]
        } else {
            v[2]
        }
    })?))
}

/// `GatherElements(data, indices, axis)` of constants.
pub(super) fn gather_elements(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["axis"])?;
    let (x, idx) = (konst(ctx, n, 0)?, konst(ctx, n, 1)?);
    let r = x.dims.len() as i64;
    let ax = a.int("axis", 0);
    let ax = if ax < 0 { ax + r } else { ax };
    if !(0..r).contains(&ax) || idx.dims.len() != x.dims.len() {
        bail!(
            "GatherElements axis {ax} or index rank {:?} does not fit {:?}",
            idx.dims,
            x.dims
        );
    }
    let ax = ax as usize;
    let strides: Vec<usize> = (0..x.dims.len())
        .map(|i| x.dims[i + 1..].iter().product())
        .collect();
    let mut pos = vec![0usize; idx.dims.len()];
    let mut data = Vec::with_capacity(idx.numel());
    for &v in &idx.data {
        let len = x.dims[ax] as i64;
        let j = if v < 0.0 { v as i64 + len } else { v as i64 };
        if j < 0 || j >= len {
            bail!("GatherElements index {v} is out of range for an axis of {len}");
        }
        let at: usize = pos
            .iter()
            .enumerate()
            .map(|(k, &p)| if k == ax { j as usize } else { p } * strides[k])
            .sum();
        data.push(x.data[at]);
        for k in (0..pos.len()).rev() {
            pos[k] += 1;
            if pos[k] < idx.dims[k] {
                break;
            }
            pos[k] = 0;
        }
    }
    Ok(Value::Const(Const {
        dims: idx.dims.clone(),
        data,
    }))
}

/// `And(c, m)` of a constant that is true everywhere and a computed mask: `m` broadcast
/// (transformers' padding mask combined with an all-true base); of constants, folded.
pub(super) fn and(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let (a, b) = (&n.input[0], &n.input[1]);
    match (ctx.konst(a).cloned(), ctx.konst(b).cloned()) {
        (Some(x), Some(y)) => Ok(Value::Const(map_n(&[&x, &y], |v| {
            f64::from(u8::from(v[0] != 0.0 && v[1] != 0.0))
        })?)),
        (Some(c), None) | (None, Some(c)) => {
            let m = if ctx.konst(a).is_some() { b } else { a };
            if c.data.contains(&0.0) {
                bail!("And of a mask with a constant that is false somewhere (a fixed, e.g. causal, mask) is not supported");
            }
            let Some(v) = ctx.view(m) else {
                bail!("And of '{m}', which is not a computed mask");
            };
            let index = map_n(&[&c, &v.index], |x| x[1])?;
            super::view::settle(ctx, label, v.with_index(index))
        }
        (None, None) => bail!("And of two computed masks is not supported"),
    }
}

/// `GatherND(data, indices)` (batch_dims 0) with constant indices: of a constant, folded;
/// of a computed tensor, a view.
pub(super) fn gather_nd(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["batch_dims"])?;
    if a.int("batch_dims", 0) != 0 {
        bail!("GatherND with batch_dims > 0 is not supported");
    }
    let idx = konst(ctx, n, 1)?.clone();
    let (data, view) = moved_data(ctx, n)?;
    let k = *idx.dims.last().unwrap_or(&0);
    if k == 0 || k > data.dims.len() {
        bail!(
            "GatherND index tuples of {k} for data of rank {}",
            data.dims.len()
        );
    }
    let inner: usize = data.dims[k..].iter().product();
    let strides: Vec<usize> = (0..k)
        .map(|i| data.dims[i + 1..].iter().product())
        .collect();
    let mut out = Vec::with_capacity(idx.numel() / k * inner);
    for t in idx.data.chunks_exact(k) {
        let mut at = 0;
        for (i, &v) in t.iter().enumerate() {
            let len = data.dims[i] as i64;
            let j = if v < 0.0 { v as i64 + len } else { v as i64 };
            if j < 0 || j >= len {
                bail!("GatherND index {v} is out of range for an axis of {len}");
            }
            at += j as usize * strides[i];
        }
        out.extend_from_slice(&data.data[at..at + inner]);
    }
    let mut dims = idx.dims[..idx.dims.len() - 1].to_vec();
    dims.extend(&data.dims[k..]);
    let c = Const { dims, data: out };
    moved(ctx, label, c, view)
}

/// The data a data-movement op (GatherND, Expand) rearranges: a constant's values, or a
/// computed tensor's view index (the same rearrangement then applies to it).
fn moved_data(ctx: &Ctx, n: &NodeProto) -> Result<(Const, Option<View>)> {
    if let Some(c) = ctx.konst(&n.input[0]) {
        return Ok((c.clone(), None));
    }
    let Some(v) = ctx.view(&n.input[0]) else {
        bail!("{} of '{}', which is not a tensor", n.op_type, n.input[0]);
    };
    Ok((v.index.clone(), Some(v)))
}

/// The rearranged data of [`moved_data`]: a constant, or the view with its new index.
fn moved(ctx: &mut Ctx, label: &str, c: Const, view: Option<View>) -> Result<Value> {
    match view {
        None => Ok(Value::Const(c)),
        Some(v) => super::view::settle(ctx, label, v.with_index(c)),
    }
}

/// `Expand(x, shape)` (bidirectional broadcast, as ONNX defines it): of a constant,
/// folded; of a computed tensor, a view whose repeated entries read the same elements
/// (Hugging Face's `repeat_kv` of grouped-query attention).
pub(super) fn expand(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let shape = konst(ctx, n, 1)?;
    let target: Vec<usize> = shape
        .ints()
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| anyhow!("Expand to a negative size {d}")))
        .collect::<Result<_>>()?;
    let (x, view) = moved_data(ctx, n)?;
    let ones = Const {
        dims: target,
        data: vec![],
    };
    let dims = broadcast(&x.dims, &ones.dims)?;
    let src = sources(&x.dims, &dims);
    let c = Const {
        data: src.iter().map(|&i| x.data[i]).collect(),
        dims,
    };
    moved(ctx, label, c, view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, v) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (-2.0, -0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            assert!((erf(x) - v).abs() < 1e-12, "erf({x}) = {} vs {v}", erf(x));
        }
    }

    #[test]
    fn broadcasting_follows_numpy() {
        let a = Const {
            dims: vec![2, 1],
            data: vec![1.0, 2.0],
        };
        let b = Const {
            dims: vec![3],
            data: vec![10.0, 20.0, 30.0],
        };
        let s = map_n(&[&a, &b], |v| v[0] + v[1]).unwrap();
        assert_eq!(s.dims, vec![2, 3]);
        assert_eq!(s.data, vec![11., 21., 31., 12., 22., 32.]);
        assert!(broadcast(&[2], &[3]).is_err());
    }
}
