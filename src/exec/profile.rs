//! An opt-in per-operation time profile of planned forward passes (`LOPPER_PROFILE=1`, or
//! `lopper bench --profile`): wall time per op category (a conv is a 1×1, depthwise or
//! k×k conv, dense or sparse) summed over every node run, so a user sees which layers a
//! model's latency is made of and what pruning or sparsity changed there. Off, it costs
//! one relaxed atomic load per node.

use crate::graph::ops::Op;
use crate::graph::{Graph, NodeId};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// 0: not decided, 1: off, 2: on, 3: on with input shapes.
static ON: AtomicU8 = AtomicU8::new(0);
/// Category → (total time, node runs).
static TABLE: Mutex<BTreeMap<String, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Whether profiling is on (`LOPPER_PROFILE` set to anything but `0`, or [`enable`]).
pub fn enabled() -> bool {
    match ON.load(Ordering::Relaxed) {
        2 | 3 => true,
        1 => false,
        _ => {
            let v = std::env::var("LOPPER_PROFILE").unwrap_or_default();
            let state = match v.as_str() {
                "" | "0" => 1,
                "shapes" => 3,
                _ => 2,
            };
            ON.store(state, Ordering::Relaxed);
            state > 1
        }
    }
}

/// Whether each row is split further by the node's input shape (`LOPPER_PROFILE=shapes`):
/// which 1×1 conv of a model, not only that 1×1 convs, take the time.
pub fn by_shape() -> bool {
    enabled() && ON.load(Ordering::Relaxed) == 3
}

/// Turns profiling on or off for this process.
pub fn enable(on: bool) {
    ON.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// The category of node `i`: its op kind, a conv split by shape, `(sparse)` when it ran on
/// the compressed weights.
pub fn category(g: &Graph, i: NodeId, sparse: bool, input: Option<&[usize]>) -> String {
    let kind = match &g.nodes[i].op {
        Op::Conv2d(c) if c.groups > 1 && c.groups == c.in_channels => {
            format!("conv depthwise {}x{}", c.kernel[0], c.kernel[1])
        }
        Op::Conv2d(c) if c.kernel == [1, 1] => "conv 1x1".to_string(),
        Op::Conv2d(c) if c.groups > 1 => format!("conv grouped {}x{}", c.kernel[0], c.kernel[1]),
        Op::Conv2d(c) => format!("conv {}x{}", c.kernel[0], c.kernel[1]),
        op => op.kind().to_string(),
    };
    let kind = match (input, &g.nodes[i].op) {
        (Some(d), Op::Conv2d(c)) => format!("{kind} {d:?}->{} s{}", c.out_channels, c.stride[0]),
        (Some(d), _) => format!("{kind} {d:?}"),
        _ => kind,
    };
    if sparse {
        format!("{kind} (sparse)")
    } else {
        kind
    }
}

/// Adds one node run.
pub fn record(category: String, t: Duration) {
    let mut tab = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let e = tab.entry(category).or_insert((Duration::ZERO, 0));
    e.0 += t;
    e.1 += 1;
}

/// The table so far, largest total first: (category, total, runs); then cleared.
pub fn take() -> Vec<(String, Duration, u64)> {
    let mut tab = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = std::mem::take(&mut *tab)
        .into_iter()
        .map(|(k, (t, n))| (k, t, n))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}
