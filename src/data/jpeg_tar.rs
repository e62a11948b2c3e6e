//! Image-folder datasets stored as `.tar`, `.tar.gz` or a directory tree of
//! `<split>/<class>/<file>.jpg` (CIFAR-10 JPEG). Classes are the sorted folder names.
//! Decoding 60,000 JPEGs takes a while, so the decoded bytes are cached once in a binary
//! file keyed by the source's path, size and modification time.

use super::idx::gunzip_if_needed;
use crate::util::atomic_write;
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Decoded images of one archive: pixels `N x C x H x W`, labels and class names.
pub struct Decoded {
    pub pixels: Vec<u8>,
    pub labels: Vec<u16>,
    pub shape: [usize; 3],
    pub classes: Vec<String>,
}

const MAGIC: &[u8; 8] = b"LOPIMG01";

/// Where decoded caches live: `$LOPPER_CACHE`, else `$XDG_CACHE_HOME/lopper`, else
/// `~/.cache/lopper`, else the system temp dir.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("LOPPER_CACHE") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("lopper");
    }
    if let Ok(h) = std::env::var("HOME") {
        return PathBuf::from(h).join(".cache").join("lopper");
    }
    std::env::temp_dir().join("lopper")
}

fn cache_path(src: &Path) -> Result<PathBuf> {
    let md = std::fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stem = src
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(cache_dir().join(format!("{stem}-{}-{mtime}.imgcache", md.len())))
}

/// Loads an image archive, from the cache when it is there.
pub fn load(src: &Path) -> Result<Decoded> {
    let cache = cache_path(src)?;
    if let Ok(bytes) = std::fs::read(&cache) {
        if let Ok(d) = read_cache(&bytes) {
            return Ok(d);
        }
    }
    let d = decode_source(src)?;
    // A failed cache write only costs time next run.
    let _ = atomic_write(&cache, &write_cache(&d));
    Ok(d)
}

fn decode_source(src: &Path) -> Result<Decoded> {
    let origin = src.display().to_string();
    let mut files: Vec<(String, String, Vec<u8>)> = Vec::new(); // (class, name, bytes)
    if src.is_dir() {
        for class in sorted_dir(src)? {
            let cdir = src.join(&class);
            if !cdir.is_dir() {
                continue;
            }
            for f in sorted_dir(&cdir)? {
                let p = cdir.join(&f);
                files.push((
                    class.clone(),
                    f,
                    std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?,
                ));
            }
        }
    } else {
        let raw = std::fs::read(src).with_context(|| format!("cannot read {origin}"))?;
        let tarbytes = gunzip_if_needed(raw, &origin)?;
        let mut ar = tar::Archive::new(&tarbytes[..]);
        for e in ar
            .entries()
            .with_context(|| format!("{origin}: not a tar archive"))?
        {
            let mut e = e.with_context(|| format!("{origin}: corrupt tar entry"))?;
            if !e.header().entry_type().is_file() {
                continue;
            }
            let path = e.path()?.to_string_lossy().to_string();
            let parts: Vec<&str> = path
                .split('/')
                .filter(|s| !s.is_empty() && *s != ".")
                .collect();
            if parts.len() < 2 || !is_image(parts[parts.len() - 1]) {
                continue;
            }
            let mut b = Vec::new();
            e.read_to_end(&mut b)
                .with_context(|| format!("{origin}: truncated entry {path}"))?;
            files.push((parts[parts.len() - 2].to_string(), path.clone(), b));
        }
    }
    if files.is_empty() {
        bail!("{origin}: no images found (expected <class>/<file>.jpg entries)");
    }
    let classes: Vec<String> = files
        .iter()
        .map(|f| f.0.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let class_id: BTreeMap<&str, u16> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as u16))
        .collect();
    files.sort_by(|a, b| (class_id[a.0.as_str()], &a.1).cmp(&(class_id[b.0.as_str()], &b.1)));
    let decoded: Vec<(usize, usize, Vec<u8>)> = files
        .par_iter()
        .map(|(_, name, b)| {
            decode_jpeg(b).with_context(|| format!("{origin}: cannot decode {name}"))
        })
        .collect::<Result<_>>()?;
    let (h, w) = (decoded[0].0, decoded[0].1);
    let mut pixels = Vec::with_capacity(decoded.len() * 3 * h * w);
    for ((dh, dw, rgb), f) in decoded.iter().zip(&files) {
        if (*dh, *dw) != (h, w) {
            bail!("{origin}: {} is {dh}x{dw}, the others are {h}x{w}", f.1);
        }
        // HWC -> CHW
        for c in 0..3 {
            pixels.extend(rgb.iter().skip(c).step_by(3));
        }
    }
    let labels = files.iter().map(|f| class_id[f.0.as_str()]).collect();
    Ok(Decoded {
        pixels,
        labels,
        shape: [3, h, w],
        classes,
    })
}

fn is_image(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    l.ends_with(".jpg") || l.ends_with(".jpeg")
}

fn sorted_dir(d: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .with_context(|| format!("cannot list {}", d.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .collect();
    v.sort();
    Ok(v)
}

/// Decodes a JPEG to interleaved RGB.
fn decode_jpeg(b: &[u8]) -> Result<(usize, usize, Vec<u8>)> {
    let opts = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut d = JpegDecoder::new_with_options(b, opts);
    let px = d.decode().map_err(|e| anyhow!("{e:?}"))?;
    let info = d.info().ok_or_else(|| anyhow!("no image info"))?;
    let (h, w) = (info.height as usize, info.width as usize);
    if px.len() != h * w * 3 {
        bail!("decoded {} bytes for a {h}x{w} RGB image", px.len());
    }
    Ok((h, w, px))
}

fn write_cache(d: &Decoded) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    let names = d.classes.join("\n");
    for x in [
        d.labels.len(),
        d.shape[0],
        d.shape[1],
        d.shape[2],
        names.len(),
    ] {
        v.extend((x as u64).to_le_bytes());
    }
    v.extend(names.as_bytes());
    for l in &d.labels {
        v.extend(l.to_le_bytes());
    }
    v.extend(&d.pixels);
    v
}

fn read_cache(b: &[u8]) -> Result<Decoded> {
    if b.len() < 48 || &b[..8] != MAGIC {
        bail!("not a cache file");
    }
    let u = |i: usize| u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().unwrap()) as usize;
    let (n, c, h, w, nl) = (u(0), u(1), u(2), u(3), u(4));
    let mut off = 48;
    let names = std::str::from_utf8(b.get(off..off + nl).ok_or_else(|| anyhow!("short"))?)?;
    off += nl;
    let lab = b.get(off..off + 2 * n).ok_or_else(|| anyhow!("short"))?;
    off += 2 * n;
    let pixels = b.get(off..).ok_or_else(|| anyhow!("short"))?;
    if pixels.len() != n * c * h * w {
        bail!("cache size mismatch");
    }
    Ok(Decoded {
        pixels: pixels.to_vec(),
        labels: lab
            .chunks_exact(2)
            .map(|x| u16::from_le_bytes([x[0], x[1]]))
            .collect(),
        shape: [c, h, w],
        classes: names.split('\n').map(|s| s.to_string()).collect(),
    })
}
