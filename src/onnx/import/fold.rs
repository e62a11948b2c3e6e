//! Constant folding of the arithmetic that exporters leave around shapes and scales:
//! Sqrt, Erf, Mod, Equal, Where and Expand on constants (PyTorch's TorchScript exporter
//! computes the attention scale as `1 / sqrt(sqrt(head_dim))` and broadcasts the class
//! token through `Equal`/`Where`/`Expand` on the shape). With numpy broadcasting.

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

/// `Sqrt`, `Erf` of a constant.
pub(super) fn unary(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    let c = konst(ctx, n, 0)?;
    let f: fn(f64) -> f64 = match n.op_type.as_str() {
        "Sqrt" => f64::sqrt,
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

/// `Where(cond, x, y)` of constants.
pub(super) fn where_op(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    let (c, x, y) = (konst(ctx, n, 0)?, konst(ctx, n, 1)?, konst(ctx, n, 2)?);
    Ok(Value::Const(map_n(&[c, x, y], |v| {
        if v[0] != 0.0 {
            v[1]
        } else {
            v[2]
        }
    })?))
}

/// `Expand(x, shape)` of a constant (bidirectional broadcast, as ONNX defines it).
pub(super) fn expand(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    let x = konst(ctx, n, 0)?;
    let shape = konst(ctx, n, 1)?;
    let target: Vec<usize> = shape
        .ints()
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| anyhow!("Expand to a negative size {d}")))
        .collect::<Result<_>>()?;
    let ones = Const {
        dims: target,
        data: vec![],
    };
    let dims = broadcast(&x.dims, &ones.dims)?;
    let src = sources(&x.dims, &dims);
    Ok(Value::Const(Const {
        data: src.iter().map(|&i| x.data[i]).collect(),
        dims,
    }))
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
