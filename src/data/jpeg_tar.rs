//! Image-folder datasets stored as `.tar`, `.tar.gz` or a directory tree of
//! `[<split>/]<class>/<file>.jpg` (CIFAR-10 JPEG). Classes are the sorted folder names;
//! `train/` and `test/` folders above the class folders are the two splits.
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

fn cache_path(src: &Path, split: Option<&str>) -> Result<PathBuf> {
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
    // Folders change without their own size or mtime changing much: key them by path too.
    let tag = split.map(|s| format!("-{s}")).unwrap_or_default();
    let h = crate::util::fnv64(
        src.canonicalize()
            .unwrap_or_else(|_| src.to_path_buf())
            .to_string_lossy()
            .as_bytes(),
    );
    Ok(cache_dir().join(format!(
        "{stem}-{}-{mtime}-{h:016x}{tag}.imgcache",
        md.len()
    )))
}

/// Loads an image archive, from the cache when it is there.
///
/// `split` (`"train"` or `"test"`) selects the images under a folder of that name just
/// above the class folders (`train/<class>/x.jpg`); `None` takes every image. Asking for a
/// split of a tree that has no split folders is an error, so that a test set can never
/// silently be the training set.
pub fn load(src: &Path, split: Option<&str>) -> Result<Decoded> {
    let cache = cache_path(src, split)?;
    if let Ok(bytes) = std::fs::read(&cache) {
        if let Ok(d) = read_cache(&bytes) {
            return Ok(d);
        }
    }
    let d = decode_source(src, split)?;
    // A failed cache write only costs time next run.
    let _ = atomic_write(&cache, &write_cache(&d));
    Ok(d)
}

/// The folder names that mark a split, above the class folders.
pub const SPLIT_FOLDERS: [&str; 2] = ["train", "test"];

/// Whether a source's image paths sit in `train/` / `test/` folders.
pub fn has_split_folders(src: &Path) -> Result<bool> {
    Ok(list_images(src)?
        .iter()
        .any(|(parts, _)| split_of(parts).is_some()))
}

fn split_of(parts: &[String]) -> Option<&str> {
    let n = parts.len();
    (n >= 3 && SPLIT_FOLDERS.contains(&parts[n - 3].as_str())).then(|| parts[n - 3].as_str())
}

/// An image's relative path components and, for tar entries, its bytes (folder images are
/// read only once chosen: `None`).
type Listed = (Vec<String>, Option<Vec<u8>>);

/// Every image of a folder tree or tar.
fn list_images(src: &Path) -> Result<Vec<Listed>> {
    let origin = src.display().to_string();
    let mut out = Vec::new();
    if src.is_dir() {
        fn walk(root: &Path, rel: &mut Vec<String>, out: &mut Vec<Listed>) -> Result<()> {
            if rel.len() > 6 {
                return Ok(());
            }
            let dir = rel.iter().fold(root.to_path_buf(), |p, c| p.join(c));
            for name in sorted_dir(&dir)? {
                let p = dir.join(&name);
                rel.push(name.clone());
                if p.is_dir() {
                    walk(root, rel, out)?;
                } else if is_image(&name) && rel.len() >= 2 {
                    out.push((rel.clone(), None));
                }
                rel.pop();
            }
            Ok(())
        }
        walk(src, &mut Vec::new(), &mut out)?;
    } else {
        let raw = std::fs::read(src).with_context(|| format!("cannot read {origin}"))?;
        let tarbytes = gunzip_if_needed(raw, &origin)?;
        check_tar_header(&tarbytes, &origin)?;
        let mut ar = tar::Archive::new(&tarbytes[..]);
        for e in ar
            .entries()
            .with_context(|| format!("{origin}: not a tar archive"))?
        {
            let mut e = e.map_err(|e| anyhow!("{origin}: corrupt tar entry ({e})"))?;
            if !e.header().entry_type().is_file() {
                continue;
            }
            let path = e
                .path()
                .map_err(|_| anyhow!("{origin}: a tar entry has an unreadable path"))?
                .to_string_lossy()
                .to_string();
            let parts: Vec<String> = path
                .split('/')
                .filter(|s| !s.is_empty() && *s != ".")
                .map(str::to_string)
                .collect();
            if parts.len() < 2 || !is_image(&parts[parts.len() - 1]) {
                continue;
            }
            let mut b = Vec::new();
            e.read_to_end(&mut b)
                .map_err(|_| anyhow!("{origin}: truncated entry {}", path.escape_debug()))?;
            out.push((parts, Some(b)));
        }
    }
    Ok(out)
}

/// A tar archive starts with a 512-byte header whose checksum field matches its bytes;
/// anything else (random bytes, an HTML error page) is refused before the tar reader
/// turns it into garbage entry names.
fn check_tar_header(b: &[u8], origin: &str) -> Result<()> {
    let not_tar = || anyhow!("{origin}: not a tar archive (or a gzip of one)");
    let h = b.get(..512).ok_or_else(not_tar)?;
    let field = std::str::from_utf8(&h[148..156]).map_err(|_| not_tar())?;
    let want = u32::from_str_radix(field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
        .map_err(|_| not_tar())?;
    let sum: u32 = h
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if (148..156).contains(&i) {
                32
            } else {
                x as u32
            }
        })
        .sum();
    if sum != want {
        return Err(not_tar());
    }
    Ok(())
}

fn decode_source(src: &Path, split: Option<&str>) -> Result<Decoded> {
    let origin = src.display().to_string();
    let all = list_images(src)?;
    let split_tree = all.iter().any(|(p, _)| split_of(p).is_some());
    let mut files: Vec<(String, String, Vec<u8>)> = Vec::new(); // (class, name, bytes)
    for (parts, bytes) in all {
        if let Some(want) = split {
            if split_tree && split_of(&parts) != Some(want) {
                continue;
            }
        }
        let name = parts.join("/");
        let bytes = match bytes {
            Some(b) => b,
            None => {
                let p = src.join(&name);
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?
            }
        };
        files.push((parts[parts.len() - 2].clone(), name, bytes));
    }
    if let Some(want) = split {
        if !split_tree {
            bail!(
                "{origin}: has no train/ and test/ folders above the class folders, so there is no {want} split; \
                 arrange it as train/<class>/*.jpg and test/<class>/*.jpg, or pass --holdout FRACTION to hold out a seeded test part"
            );
        }
        if files.is_empty() {
            bail!(
                "{origin}: the {want}/ folder holds no images (expected {want}/<class>/<file>.jpg)"
            );
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
    let decoded = common_size(decoded);
    let (h, w) = (decoded[0].0, decoded[0].1);
    let mut pixels = Vec::with_capacity(decoded.len() * 3 * h * w);
    for ((dh, dw, rgb), f) in decoded.iter().zip(&files) {
        if (*dh, *dw) != (h, w) {
            bail!(
                "{origin}: internal: {} is {dh}x{dw} after resizing, the others {h}x{w}",
                f.1
            );
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

/// Brings images of different sizes to one: each image's shorter side is resized to the
/// smallest shorter side of the set, then the centre square is cropped (torchvision's
/// `Resize(S)` + `CenterCrop(S)`). A set of one size is left as it is (non-square too).
fn common_size(imgs: Vec<(usize, usize, Vec<u8>)>) -> Vec<(usize, usize, Vec<u8>)> {
    let (h0, w0) = (imgs[0].0, imgs[0].1);
    if imgs.iter().all(|(h, w, _)| (*h, *w) == (h0, w0)) {
        return imgs;
    }
    let s = imgs
        .iter()
        .map(|(h, w, _)| (*h).min(*w))
        .min()
        .unwrap_or(1)
        .max(1);
    imgs.into_par_iter()
        .map(|(h, w, rgb)| {
            let (nh, nw) = if h <= w {
                (
                    s,
                    ((w * s) as f64 / h as f64).round().max(s as f64) as usize,
                )
            } else {
                (
                    ((h * s) as f64 / w as f64).round().max(s as f64) as usize,
                    s,
                )
            };
            let r = resize_rgb(&rgb, h, w, nh, nw);
            let (top, left) = ((nh - s) / 2, (nw - s) / 2);
            let mut out = Vec::with_capacity(s * s * 3);
            for y in top..top + s {
                out.extend_from_slice(&r[(y * nw + left) * 3..(y * nw + left + s) * 3]);
            }
            (s, s, out)
        })
        .collect()
}

/// Resizes interleaved RGB bytes. Each output pixel averages the input pixels its area
/// covers (so large downscales do not alias), with bilinear weights when enlarging.
fn resize_rgb(rgb: &[u8], h: usize, w: usize, nh: usize, nw: usize) -> Vec<u8> {
    // Per axis: for each output index, (input index, weight) pairs summing to 1.
    let taps = |inp: usize, out: usize| -> Vec<Vec<(usize, f32)>> {
        let scale = inp as f64 / out as f64;
        (0..out)
            .map(|o| {
                if scale > 1.0 {
                    // Box filter over [o·scale, (o+1)·scale).
                    let (a, b) = (o as f64 * scale, (o + 1) as f64 * scale);
                    let mut t = Vec::new();
                    let mut i = a.floor() as usize;
                    while (i as f64) < b && i < inp {
                        let cover = (b.min(i as f64 + 1.0) - a.max(i as f64)) / scale;
                        t.push((i, cover as f32));
                        i += 1;
                    }
                    t
                } else {
                    let x = ((o as f64 + 0.5) * scale - 0.5).clamp(0.0, (inp - 1) as f64);
                    let i0 = x.floor() as usize;
                    let i1 = (i0 + 1).min(inp - 1);
                    let f = (x - i0 as f64) as f32;
                    vec![(i0, 1.0 - f), (i1, f)]
                }
            })
            .collect()
    };
    let (ty, tx) = (taps(h, nh), taps(w, nw));
    let mut out = vec![0u8; nh * nw * 3];
    for (oy, ry) in ty.iter().enumerate() {
        for (ox, rx) in tx.iter().enumerate() {
            let mut acc = [0f32; 3];
            for &(iy, wy) in ry {
                for &(ix, wx) in rx {
                    let p = (iy * w + ix) * 3;
                    for c in 0..3 {
                        acc[c] += wy * wx * rgb[p + c] as f32;
                    }
                }
            }
            for c in 0..3 {
                out[(oy * nw + ox) * 3 + c] = acc[c].round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
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
