//! Constants during import (initialisers, `Constant` nodes, folded shape arithmetic) and
//! the conversions between ONNX `TensorProto`s and host data.

use anyhow::{bail, Result};
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

fn raw<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
    b.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunk of N bytes")))
        .collect()
}

/// Reads an ONNX tensor (inline or raw data) into a constant.
pub fn from_proto(t: &TensorProto) -> Result<Const> {
    if t.dims.iter().any(|&d| d < 0) {
        bail!("tensor '{}' has negative dims {:?}", t.name, t.dims);
    }
    if !t.external_data.is_empty() {
        bail!(
            "tensor '{}' keeps its data in an external file, which is not supported",
            t.name
        );
    }
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let r = &t.raw_data;
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
        UINT8 | BOOL => r.iter().map(|&v| v as f64).collect(),
        dt => bail!(
            "tensor '{}' has data type {dt}; supported: float, double, int8/32/64, uint8, bool",
            t.name
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
