//! Constants during import (initialisers, `Constant` nodes, folded shape arithmetic) and
//! the conversions between ONNX `TensorProto`s and host data.

use super::external::ExternalData;
use anyhow::{bail, Result};
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::TensorProto;

/// A constant tensor. Values are held as f64, which is exact for f32 weights and for the
/// int64 shape arithmetic PyTorch exports.
#[derive(Clone, Debug, PartialEq)]
pub struct Const {
    pub dims: Vec<usize>,
    pub data: Vec<f64>,
}

impl Const {
    pub fn scalar(v: f64) -> Const {
        Const {
            dims: vec![],
            data: vec![v],
        }
    }
    pub fn vec_i64(v: &[i64]) -> Const {
        Const {
            dims: vec![v.len()],
            data: v.iter().map(|&x| x as f64).collect(),
        }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    pub fn ints(&self) -> Vec<i64> {
        self.data.iter().map(|&x| x as i64).collect()
    }
    pub fn f32s(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }
}

const FLOAT: i32 = 1;
const UINT8: i32 = 2;
const INT8: i32 = 3;
const INT32: i32 = 6;
const INT64: i32 = 7;
const BOOL: i32 = 9;
const DOUBLE: i32 = 11;
const FLOAT16: i32 = 10;
const BFLOAT16: i32 = 16;

/// bfloat16 → f32 (the upper half of an f32).
fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The name of an ONNX element type, for messages.
pub fn elem_type_name(dt: i32) -> String {
    match dt {
        FLOAT => "float".into(),
        UINT8 => "uint8".into(),
        INT8 => "int8".into(),
        INT32 => "int32".into(),
        INT64 => "int64".into(),
        BOOL => "bool".into(),
        FLOAT16 => "float16".into(),
        DOUBLE => "double".into(),
        BFLOAT16 => "bfloat16".into(),
        d => format!("type {d}"),
    }
}

/// Whether an input of this element type can feed lopper's f32 graph.
pub fn is_float_type(dt: i32) -> bool {
    matches!(dt, FLOAT | FLOAT16 | DOUBLE | BFLOAT16)
}

fn raw<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
    b.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunk of N bytes")))
        .collect()
}

/// Reads an ONNX tensor (inline or raw data) into a constant; a tensor with external
/// data is an error naming it (see [`from_proto_with`]).
pub fn from_proto(t: &TensorProto) -> Result<Const> {
    from_proto_with(t, &mut ExternalData::new(None))
}

/// [`from_proto`] reading external data through `ext`.
pub fn from_proto_with(t: &TensorProto, ext: &mut ExternalData) -> Result<Const> {
    if t.dims.iter().any(|&d| d < 0) {
        bail!("tensor '{}' has negative dims {:?}", t.name, t.dims);
    }
    let external = t.data_location.enum_value_or_default() == DataLocation::EXTERNAL
        || !t.external_data.is_empty();
    let r: &[u8] = if external { ext.bytes(t)? } else { &t.raw_data };
    if external && r.is_empty() && t.dims.iter().product::<i64>() != 0 {
        bail!("tensor '{}': its external data is empty", t.name);
    }
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let data: Vec<f64> = match t.data_type {
        FLOAT if !r.is_empty() => raw::<4>(r, |b| f32::from_le_bytes(b) as f64),
        FLOAT => t.float_data.iter().map(|&v| v as f64).collect(),
        DOUBLE if !r.is_empty() => raw::<8>(r, f64::from_le_bytes),
        DOUBLE => t.double_data.clone(),
        INT64 if !r.is_empty() => raw::<8>(r, |b| i64::from_le_bytes(b) as f64),
        INT64 => t.int64_data.iter().map(|&v| v as f64).collect(),
        INT32 if !r.is_empty() => raw::<4>(r, |b| i32::from_le_bytes(b) as f64),
        INT32 | INT8 | UINT8 | BOOL if r.is_empty() => {
            t.int32_data.iter().map(|&v| v as f64).collect()
        }
        INT8 => r.iter().map(|&v| v as i8 as f64).collect(),
        FLOAT16 if !r.is_empty() => raw::<2>(r, |b| crate::util::f16_to_f32(u16::from_le_bytes(b)) as f64),
        FLOAT16 => t.int32_data.iter().map(|&v| crate::util::f16_to_f32(v as u16) as f64).collect(),
        BFLOAT16 if !r.is_empty() => raw::<2>(r, |b| bf16_to_f32(u16::from_le_bytes(b)) as f64),
        BFLOAT16 => t.int32_data.iter().map(|&v| bf16_to_f32(v as u16) as f64).collect(),
        UINT8 | BOOL => r.iter().map(|&v| v as f64).collect(),
        dt => bail!(
            "tensor '{}' has data type {}; supported: float, float16, bfloat16, double, int8/32/64, uint8, bool",
            t.name,
            elem_type_name(dt)
        ),
    };
    let n: usize = dims.iter().product();
    if data.len() != n {
        bail!(
            "tensor '{}' holds {} values for dims {:?} ({} expected): truncated or malformed",
            t.name,
            data.len(),
            dims,
            n
        );
    }
    Ok(Const { dims, data })
}

/// An f32 initialiser with raw little-endian data.
pub fn f32_proto(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.dims = dims.iter().map(|&d| d as i64).collect();
    t.data_type = FLOAT;
    t.raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    t
}

/// An int64 initialiser (shapes, pads).
pub fn i64_proto(name: &str, data: &[i64]) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.dims = vec![data.len() as i64];
    t.data_type = INT64;
    t.int64_data = data.to_vec();
    t
}

/// A rank-0 int64 initialiser (a Gather index that drops its axis).
pub fn i64_scalar(name: &str, v: i64) -> TensorProto {
    let mut t = i64_proto(name, &[v]);
    t.dims = vec![];
    t
}

#[cfg(test)]
mod half_tests {
    use super::*;

    #[test]
    fn half_conversions() {
        assert_eq!(crate::util::f16_to_f32(0x3c00), 1.0);
        assert_eq!(crate::util::f16_to_f32(0xc000), -2.0);
        assert_eq!(crate::util::f16_to_f32(0x7bff), 65504.0);
        assert_eq!(crate::util::f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(crate::util::f16_to_f32(0x7c00).is_infinite());
        assert!(crate::util::f16_to_f32(0x7e00).is_nan());
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
    }
}
