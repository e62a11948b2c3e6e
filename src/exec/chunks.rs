//! Large eval batches: the layers on large maps run a few images at a time, the rest on
//! the whole batch.
//!
//! At batch 64 a MobileNetV2 (CIFAR) expansion on its 32×32 maps writes 38 MB and the
//! depthwise conv after it reads them back: both run at the speed of memory, not of the
//! arithmetic, and a 90 % sparse 1×1 conv there was 1.5–1.8× faster than the dense one
//! where the same conv on 8×8 maps was 3.7–4.2×. Run as chunks of one image per thread,
//! a layer's output (590 KB an image) is still in the core's L2 when the next layer
//! reads it. Chunking the whole pass was slower (BENCHMARKS §27: the small maps of the
//! later stages lose their batch parallelism faster than the large ones gain), so only
//! a prefix is chunked: the nodes before the first point where one value alone is live
//! and every later value of an image is small ([`SMALL_BYTES`]). The prefix's output is
//! concatenated over the chunks and the pass goes on with the whole batch.
//!
//! Eval passes only (per-image ops throughout: batch norm runs on its running
//! statistics); `LOPPER_CHUNK=0` turns it off for A/B runs, `LOPPER_CHUNK=k` sets the
//! images per chunk (default: one per thread).

use crate::graph::{Graph, NodeId, Shape};

/// Bytes of one image's value at or under which a node may run on the whole batch.
/// MobileNetV2 (CIFAR) at batch 64 with its 16×16 stage (196 KB values) chunked too (128
/// KB): in a quiet hour of the host dense 37.5–40.8 → 34.2–35.2 ms, 90 % sparse 20.2–22.1
/// → 17.2–18.6 (alternated ×3), but in a slow one (cross-core round trips of 450 ns, one
/// per layer and chunk) dense 44.1–44.8 → 47.0–47.5, sparse 29.5–30.8 → 31.3–32.0; at
/// 256 KB only the 32×32 stages are chunked, which gained in both.
const SMALL_BYTES: usize = 256 << 10;

/// Bytes of one image's value above which the prefix is not chunked: an image's values
/// must stay in a core's L2 (1 MB on the machines measured), with the layer's input beside
/// them, for the chunks to pay. At 224×224 (ResNet-50, EfficientNet-B0, MobileNetV3 at
/// batch 8, 3.2 MB a value) chunks of two images ran 5–8 % slower than the whole batch,
/// MobileNetV3-small at batch 64 (903 KB values) 3–10 % slower; MobileNetV2 (CIFAR, 590
/// KB) gains.
const MAX_BYTES: usize = 768 << 10;

/// Bytes of the whole batch's largest prefix value under which the pass is not chunked:
/// that value stays in the last-level cache (32 MB on the machines measured) whole.
/// MobileNetV3-small at batch 8 (7 MB) ran 5 % slower in chunks of two images.
const MIN_BATCH_BYTES: usize = 16 << 20;

/// The chunked prefix of a plan: nodes `0..cut`, whose only value read later is `live`;
/// `head`: the bytes of the largest value of one image in it.
#[derive(Clone, Copy, Debug)]
pub struct Prefix {
    pub cut: usize,
    pub live: NodeId,
    pub head: usize,
}

/// The prefix of `g` worth chunking, if any: the first cut after which every value is
/// small, where one small non-input value is all that crosses it (not a large map to be
/// concatenated and read back from memory), with a large value before it. For plans
/// that return no value but the graph's outputs (no kept or masked nodes).
pub fn prefix(g: &Graph, shapes: &[Shape], consumers: &[Vec<NodeId>]) -> Option<Prefix> {
    let n = g.nodes.len();
    static SMALL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let small = *SMALL.get_or_init(|| {
        std::env::var("LOPPER_CHUNK_KB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(SMALL_BYTES, |kb| kb << 10)
    });
    let bytes = |i: NodeId| 4 * shapes[i].iter().product::<usize>();
    // The last node reading each value (graph outputs: past the end).
    let mut last: Vec<usize> = consumers
        .iter()
        .enumerate()
        .map(|(v, c)| c.iter().copied().max().unwrap_or(v))
        .collect();
    for &o in &g.outputs {
        last[o] = n;
    }
    // Largest value at or after each node.
    let mut tail = vec![0usize; n + 1];
    for i in (0..n).rev() {
        tail[i] = tail[i + 1].max(bytes(i));
    }
    let inputs = g.input_ids();
    let mut head = 0usize;
    for (cut, &after) in tail.iter().enumerate().take(n).skip(1) {
        head = head.max(bytes(cut - 1));
        if head > MAX_BYTES {
            return None;
        }
        if after > small {
            continue;
        }
        if head <= small {
            return None;
        }
        let mut live = (0..cut).filter(|&v| last[v] >= cut);
        let (Some(v), None) = (live.next(), live.next()) else {
            continue;
        };
        if bytes(v) > small || inputs.contains(&v) {
            continue;
        }
        return Some(Prefix { cut, live: v, head });
    }
    None
}

/// Images per chunk for a pass of `n` images through `p`, if that pass is chunked: one
/// per thread (`LOPPER_CHUNK` to override, `0` for none), at least four chunks, and a
/// batch whose largest prefix value overflows the last-level cache.
pub fn images(n: usize, p: &Prefix) -> Option<usize> {
    static K: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let k = (*K.get_or_init(|| match std::env::var("LOPPER_CHUNK") {
        Ok(v) => v.parse().ok(),
        Err(_) => Some(rayon::current_num_threads().max(1)),
    }))?;
    (k > 0 && n >= 4 * k && n * p.head >= MIN_BATCH_BYTES).then_some(k)
}

#[cfg(test)]
mod tests {
    use crate::exec::{Feeds, Mode, Plan, PlanOpts};
    use candle_core::{Device, Tensor};

    /// MobileNetV2 (CIFAR) chunks its 32×32 stages and hands one small value over; a
    /// net on small maps has no prefix; a training plan never chunks.
    #[test]
    fn prefix_ends_where_the_maps_get_small() {
        let g = crate::zoo::build("mobilenetv2@3x32x32#10", 3).unwrap();
        let shapes = g.shapes().unwrap();
        let p = super::prefix(&g, &shapes, &g.consumers()).expect("a prefix");
        let bytes = |i: usize| 4 * shapes[i].iter().product::<usize>();
        assert!(bytes(p.live) <= super::SMALL_BYTES, "{p:?}");
        assert!((p.cut..g.nodes.len()).all(|i| bytes(i) <= super::SMALL_BYTES));
        assert!(p.head > super::SMALL_BYTES && p.head <= super::MAX_BYTES);
        let small = crate::zoo::build("mobilenetv2@3x8x8#10", 3).unwrap();
        let s = small.shapes().unwrap();
        assert!(super::prefix(&small, &s, &small.consumers()).is_none());
        let train = Plan::new(&g, Mode::Train, &PlanOpts::default()).unwrap();
        assert_eq!(train.chunked_prefix(), None);
    }

    /// The chunked pass gives the whole batch's outputs (chunks of 1, 2 and 3 images,
    /// the last one short).
    #[test]
    fn chunked_pass_matches_the_whole_batch() {
        let g = crate::zoo::build("mobilenetv2@3x32x32#10", 5).unwrap();
        let plan = Plan::new(&g, Mode::Eval, &PlanOpts::default()).unwrap();
        assert!(plan.chunked_prefix().is_some());
        let n = 7;
        let xv: Vec<f32> = (0..n * 3 * 32 * 32)
            .map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(xv, (n, 3, 32, 32), &Device::Cpu).unwrap();
        let f = Feeds::default();
        let run = |k| {
            let out = plan.run_chunked(&g, &[&x], &f, k).unwrap();
            out.outputs[0]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let whole = run(None);
        let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
        for k in [1, 2, 3] {
            let chunked = run(Some(k));
            assert_eq!(chunked.len(), whole.len());
            for (i, (a, b)) in chunked.iter().zip(&whole).enumerate() {
                assert!((a - b).abs() <= 1e-5 * scale, "k {k} [{i}]: {a} vs {b}");
            }
        }
    }
}
