//! NumPy `.npy` arrays of integers (`np.save` of tokenizer output: int64, int32, uint8,
//! uint16, bool), the format token datasets come in. Little-endian, C order; versions 1–3
//! of the header. Errors name the file and what does not fit.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// An integer array: its shape and values (row-major).
#[derive(Debug, PartialEq)]
pub struct IntArray {
    pub shape: Vec<usize>,
    pub values: Vec<i64>,
}

/// Reads an integer `.npy` file.
pub fn read_ints(path: &Path) -> Result<IntArray> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_ints(&bytes)
        .with_context(|| format!("{}: not a readable integer .npy array", path.display()))
}

/// Parses the bytes of an integer `.npy` file.
pub fn parse_ints(b: &[u8]) -> Result<IntArray> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        bail!("no .npy magic (\\x93NUMPY) at the start");
    }
    let (hlen, start): (usize, usize) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => bail!("unsupported .npy version {v}"),
    };
    let end = start
        .checked_add(hlen)
        .filter(|&e| e <= b.len())
        .context("the header runs past the end of the file (truncated?)")?;
    let header = std::str::from_utf8(&b[start..end]).context("the header is not text")?;
    let descr = field(header, "descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if field(header, "fortran_order")?.trim() != "False" {
        bail!("Fortran-order arrays are not supported (save with np.ascontiguousarray)");
    }
    let shape_text = field(header, "shape")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().with_context(|| format!("shape entry '{s}'")))
        .collect::<Result<_>>()?;
    let n: usize = shape.iter().product();
    let data = &b[end..];
    let (width, read): (usize, fn(&[u8]) -> i64) = match descr {
        "<i8" => (8, |c| i64::from_le_bytes(c.try_into().expect("8 bytes"))),
        "<i4" => (4, |c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64),
        "<u2" => (2, |c| u16::from_le_bytes(c.try_into().expect("2 bytes")) as i64),
        "<i2" => (2, |c| i16::from_le_bytes(c.try_into().expect("2 bytes")) as i64),
        "|u1" | "|b1" => (1, |c| c[0] as i64),
        "|i1" => (1, |c| c[0] as i8 as i64),
        other => bail!(
            "element type '{other}' is not a little-endian integer type (int64, int32, int16, uint16, uint8, bool)"
        ),
    };
    if data.len() != n * width {
        bail!(
            "shape {shape:?} of '{descr}' needs {} data bytes, the file has {} (truncated?)",
            n * width,
            data.len()
        );
    }
    Ok(IntArray {
        shape,
        values: data.chunks_exact(width).map(read).collect(),
    })
}

/// The bytes of an int64 `.npy` file (version 1) holding `values` in `shape`: for writing
/// token sets (tests, converters).
pub fn int64_bytes(shape: &[usize], values: &[i64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    npy_bytes("<i8", &tuple, &data)
}

/// A version-1 `.npy` file: the header (padded to 64 bytes, as NumPy writes it) and `data`.
fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(data);
    b
}

/// The text of one entry of the header dictionary (`'key': value,`), tuples whole.
fn field<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let k = header
        .find(&format!("'{key}'"))
        .with_context(|| format!("the header has no '{key}'"))?;
    let rest = header[k + key.len() + 2..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .context("malformed header")?
        .trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')').map(|i| i + 1)
    } else {
        rest.find([',', '}'])
    }
    .context("malformed header")?;
    Ok(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_numpy_writes_and_names_what_is_wrong() {
        let d: Vec<u8> = [3i64, -1, 7, 0, 1, 2]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse_ints(&npy_bytes("<i8", "(2, 3)", &d)).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.values, vec![3, -1, 7, 0, 1, 2]);
        let a = parse_ints(&npy_bytes("|b1", "(4,)", &[1, 0, 1, 1])).unwrap();
        assert_eq!((a.shape, a.values), (vec![4], vec![1, 0, 1, 1]));
        let e = format!(
            "{:#}",
            parse_ints(&npy_bytes("<i8", "(2, 3)", &d[..40])).unwrap_err()
        );
        assert!(e.contains("truncated"), "{e}");
        let e = format!(
            "{:#}",
            parse_ints(&npy_bytes("<f4", "(1,)", &[0; 4])).unwrap_err()
        );
        assert!(e.contains("'<f4'"), "{e}");
        assert!(parse_ints(b"PK\x03\x04 a zip").is_err());
        let b = int64_bytes(&[3], &[5, 6, 7]);
        assert_eq!(parse_ints(&b).unwrap().values, vec![5, 6, 7]);
    }
}
