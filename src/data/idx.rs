//! IDX files (MNIST family): `00 00 08 NDIM`, NDIM big-endian u32 sizes, u8 data.
//! Gzip is detected from the content, not the name.

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::Path;

/// A decoded IDX array of unsigned bytes.
#[derive(Clone, Debug)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads raw or gzipped bytes of a file.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    gunzip_if_needed(raw, &path.display().to_string())
}

pub fn gunzip_if_needed(raw: Vec<u8>, origin: &str) -> Result<Vec<u8>> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{origin}: corrupt or truncated gzip data"))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes; `origin` names the file in errors.
pub fn parse_idx(bytes: &[u8], origin: &str) -> Result<IdxArray> {
    if bytes.len() < 4 {
        bail!(
            "{origin}: truncated IDX file ({} bytes, no header)",
            bytes.len()
        );
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        bail!(
            "{origin}: wrong magic number {:02x}{:02x}{:02x}{:02x} (expected 0000 08 NN)",
            bytes[0],
            bytes[1],
            bytes[2],
            bytes[3]
        );
    }
    if bytes[2] != 0x08 {
        bail!(
            "{origin}: IDX element type 0x{:02x} is not unsigned byte (0x08)",
            bytes[2]
        );
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 || ndim > 4 {
        bail!("{origin}: IDX with {ndim} dimensions is not supported");
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        bail!("{origin}: truncated IDX header");
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n: usize = dims.iter().product();
    let have = bytes.len() - header;
    if have < n {
        bail!("{origin}: truncated IDX data: dims {dims:?} need {n} bytes, file has {have}");
    }
    if have > n {
        bail!("{origin}: {} trailing bytes after IDX data", have - n);
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Reads an IDX file (raw or gzipped).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    parse_idx(&read_maybe_gz(path)?, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        v
    }

    #[test]
    fn parses_and_rejects() {
        let a = parse_idx(&idx(&[2, 3], &[1, 2, 3, 4, 5, 6]), "t").unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        let e = parse_idx(&idx(&[2, 3], &[1, 2, 3]), "f.idx")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.idx") && e.contains("truncated"), "{e}");
        let mut bad = idx(&[1], &[0]);
        bad[0] = 7;
        assert!(parse_idx(&bad, "m")
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(parse_idx(&[0, 0], "s")
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }
}
