//! Dependency groups: which channels must be removed together.
//!
//! Every node output channel (axis 0 of its per-sample shape; a feature for vectors) is an
//! element. Each op's [`Coupling`] rule unions elements: pass-through ops tie output `c`
//! to input `c`; add/mul tie all same-width inputs to the output; concat and channel
//! padding tie with offsets; depthwise convs tie input `c` to output `c`; flatten ties
//! channel `c` to its block of features. Conv/linear decouple. An equivalence class is a
//! *unit* (one removable channel, everywhere it appears); units that share a node form a
//! *group*. Graph inputs, graph outputs, opaque ops (reshape, softmax) and
//! grouped-but-not-depthwise convs are blocked: their units are never removed.
//! No names are consulted anywhere.

use crate::graph::ops::Coupling;
use crate::graph::shape::numel;
use crate::graph::Shape;
use crate::graph::{Graph, NodeId};
use anyhow::Result;
use std::collections::BTreeMap;

/// One removable channel: every (node, output index) it occupies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub elems: Vec<(NodeId, usize)>,
    /// True if any element is blocked (input, output, opaque): never removed.
    pub blocked: bool,
    /// The first rule that blocked it: the node and why.
    pub blocked_by: Option<(NodeId, Block)>,
}

/// Why a node's rule keeps channels at full width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// The graph input.
    Input,
    /// A graph output: outputs keep their width.
    Output,
    /// An op whose channel mapping cannot be followed (a general reshape, a softmax, …).
    Opaque,
    /// A grouped (not depthwise) convolution: widths must stay divisible by the groups.
    Grouped,
    /// A pass-through op that changes the width, or a join of unequal widths.
    WidthMismatch,
    /// Normalised across channels (LayerNorm): a transformer's embedding dimension.
    Normalized,
}

impl Block {
    pub fn describe(self) -> &'static str {
        match self {
            Block::Input => "the graph input",
            Block::Output => "a graph output (kept at full width)",
            Block::Opaque => "an op whose channel mapping cannot be followed",
            Block::Grouped => "a grouped convolution (widths must stay divisible by its groups)",
            Block::WidthMismatch => "an op joining or passing tensors of different widths",
            Block::Normalized => {
                "a normalisation across channels (LayerNorm: the embedding dimension)"
            }
        }
    }
}

/// A parameter axis a group touches: slicing `param` of `node` along `axis`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: NodeId,
    pub param: &'static str,
    pub axis: usize,
    /// The node whose output channels index this axis (the node itself for output axes,
    /// its input for the input axis of a conv/linear).
    pub indexed_by: NodeId,
}

#[derive(Clone, Debug)]
pub struct Group {
    pub units: Vec<Unit>,
    /// Node outputs whose channels belong to this group, ascending.
    pub nodes: Vec<NodeId>,
    /// Every parameter axis sliced when units of this group are removed.
    pub members: Vec<Member>,
}

impl Group {
    /// Units that may be removed.
    pub fn prunable_units(&self) -> Vec<usize> {
        (0..self.units.len())
            .filter(|&u| !self.units[u].blocked)
            .collect()
    }

    /// Indices of parameter `m`'s axis that unit `u` covers.
    pub fn indices(&self, u: usize, m: &Member) -> Vec<usize> {
        self.units[u]
            .elems
            .iter()
            .filter(|(n, _)| *n == m.indexed_by)
            .map(|&(_, i)| i)
            .collect()
    }
}

/// All groups of a graph plus the element → (group, unit) map.
#[derive(Clone, Debug)]
pub struct Groups {
    pub groups: Vec<Group>,
    /// Channel count of every node output.
    pub channels: Vec<usize>,
    /// `(group, unit)` of every (node, channel).
    pub owner: Vec<Vec<(usize, usize)>>,
}

struct Uf {
    parent: Vec<usize>,
}

impl Uf {
    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }
    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent[a.max(b)] = a.min(b);
        }
    }
}

/// Derives the dependency groups of `g`.
///
/// Every (node, channel) pair is an element. The ops' coupling rules join elements that
/// must be removed together into *units*; units that share a node form a *group*; the
/// parameters whose axes those nodes index are the group's *members*.
pub fn dependency_groups(g: &Graph) -> Result<Groups> {
    let shapes = g.shapes()?;
    let el = Elements::new(&shapes);
    let (mut uf, blocked) = couple(g, &shapes, &el);
    let (units, unit_of) = units(&el, &mut uf, &blocked);
    let (mut groups, owner) = group_units(&el, units, &unit_of);
    for m in members(g, &el.ch, &owner) {
        let gi = owner[m.indexed_by][0].0;
        groups[gi].members.push(m);
    }
    Ok(Groups {
        groups,
        channels: el.ch,
        owner,
    })
}

/// Per element: the node whose rule blocked it, and why.
type Blocked = Option<(NodeId, Block)>;

/// The element numbering: node `i`'s channel `c` is element `off[i] + c`.
struct Elements {
    ch: Vec<usize>,
    off: Vec<usize>,
}

impl Elements {
    fn new(shapes: &[Shape]) -> Self {
        let ch: Vec<usize> = shapes
            .iter()
            .map(|s| s.first().copied().unwrap_or(1))
            .collect();
        let mut off = vec![0usize; ch.len() + 1];
        for i in 0..ch.len() {
            off[i + 1] = off[i] + ch[i];
        }
        Elements { ch, off }
    }
    fn e(&self, node: usize, c: usize) -> usize {
        self.off[node] + c
    }
    fn total(&self) -> usize {
        self.off[self.ch.len()]
    }
    fn nodes(&self) -> usize {
        self.ch.len()
    }
    /// Blocks every channel of `node`, recording `by` (the rule's node) and why, unless
    /// an earlier rule already did.
    fn block(&self, blocked: &mut [Blocked], node: usize, by: NodeId, why: Block) {
        blocked[self.off[node]..self.off[node + 1]]
            .iter_mut()
            .for_each(|b| {
                b.get_or_insert((by, why));
            })
    }
    /// Couples channel `c` of `a` with channel `c` of `b` for every `c < n`.
    fn pair(&self, uf: &mut Uf, a: usize, b: usize, n: usize) {
        (0..n).for_each(|c| uf.union(self.e(a, c), self.e(b, c)));
    }
}

/// Applies every node's coupling rule: the union-find over elements, and which elements
/// may never be removed (graph inputs and outputs, boundaries of opaque ops).
fn couple(g: &Graph, shapes: &[Shape], el: &Elements) -> (Uf, Vec<Blocked>) {
    let ch = &el.ch;
    let mut uf = Uf {
        parent: (0..el.total()).collect(),
    };
    let mut blocked: Vec<Blocked> = vec![None; el.total()];
    for (i, node) in g.nodes.iter().enumerate() {
        let ins = &node.inputs;
        match node.op.spec().coupling() {
            Coupling::Source => el.block(&mut blocked, i, i, Block::Input),
            Coupling::Decouple => {}
            Coupling::PassThrough if ch[ins[0]] == ch[i] => el.pair(&mut uf, ins[0], i, ch[i]),
            Coupling::Grouped { groups } if groups == ch[ins[0]] && groups == ch[i] => {
                el.pair(&mut uf, ins[0], i, ch[i])
            }
            // A width change through a pass-through op, or a grouped (not depthwise) conv
            // whose widths must stay divisible per group: both sides are fixed.
            Coupling::PassThrough => {
                el.block(&mut blocked, ins[0], i, Block::WidthMismatch);
                el.block(&mut blocked, i, i, Block::WidthMismatch);
            }
            Coupling::Grouped { .. } => {
                el.block(&mut blocked, ins[0], i, Block::Grouped);
                el.block(&mut blocked, i, i, Block::Grouped);
            }
            Coupling::Join => {
                for &j in ins {
                    if shapes[j].len() == shapes[i].len() && ch[j] == ch[i] {
                        el.pair(&mut uf, j, i, ch[i]);
                    } else if numel(&shapes[j]) != 1 && ch[j] != 1 {
                        el.block(&mut blocked, j, i, Block::WidthMismatch);
                        el.block(&mut blocked, i, i, Block::WidthMismatch);
                    }
                }
            }
            Coupling::Concat { lead } => {
                let mut o = lead;
                for &j in ins {
                    (0..ch[j]).for_each(|c| uf.union(el.e(j, c), el.e(i, o + c)));
                    o += ch[j];
                }
            }
            Coupling::Gather { indices } => {
                for (c, &src) in indices.iter().enumerate() {
                    uf.union(el.e(ins[0], src), el.e(i, c));
                }
            }
            Coupling::Flatten => {
                let inner = numel(&shapes[ins[0]]) / ch[ins[0]].max(1);
                for c in 0..ch[ins[0]] {
                    (0..inner).for_each(|k| uf.union(el.e(ins[0], c), el.e(i, c * inner + k)));
                }
            }
            Coupling::Reshape => {
                let (si, so) = (&shapes[ins[0]], &shapes[i]);
                let (ci, co) = (ch[ins[0]], ch[i]);
                if ci == co {
                    el.pair(&mut uf, ins[0], i, co);
                } else if ci > 0 && co % ci == 0 && numel(so) == co {
                    // Flatten: input channel c is output features [c·inner, (c+1)·inner).
                    let inner = co / ci;
                    for c in 0..ci {
                        (0..inner).for_each(|k| uf.union(el.e(ins[0], c), el.e(i, c * inner + k)));
                    }
                } else if co > 0 && ci % co == 0 && numel(si) == ci {
                    // Un-flatten: input features [c·inner, (c+1)·inner) are output channel c.
                    let inner = ci / co;
                    for c in 0..co {
                        (0..inner).for_each(|k| uf.union(el.e(i, c), el.e(ins[0], c * inner + k)));
                    }
                } else {
                    el.block(&mut blocked, ins[0], i, Block::Opaque);
                    el.block(&mut blocked, i, i, Block::Opaque);
                }
            }
            Coupling::Normalized => {
                if ch[ins[0]] == ch[i] {
                    el.pair(&mut uf, ins[0], i, ch[i]);
                }
                el.block(&mut blocked, ins[0], i, Block::Normalized);
                el.block(&mut blocked, i, i, Block::Normalized);
            }
            Coupling::Heads {
                heads,
                head_dim,
                kv_heads,
            } if kv_heads > 0
                && heads % kv_heads == 0
                && ch[i] == heads * head_dim
                && ch[ins[0]] == (heads + 2 * kv_heads) * head_dim =>
            {
                // kv group g: its key and value heads, its r = heads/kv_heads query heads
                // and their output channels.
                let (q_end, r) = (heads * head_dim, heads / kv_heads);
                let kv_width = kv_heads * head_dim;
                for g in 0..kv_heads {
                    let first = el.e(i, g * r * head_dim);
                    for j in g * r * head_dim..(g + 1) * r * head_dim {
                        uf.union(first, el.e(i, j));
                        uf.union(first, el.e(ins[0], j));
                    }
                    for j in g * head_dim..(g + 1) * head_dim {
                        uf.union(first, el.e(ins[0], q_end + j));
                        uf.union(first, el.e(ins[0], q_end + kv_width + j));
                    }
                }
            }
            Coupling::Heads { .. } => {
                el.block(&mut blocked, ins[0], i, Block::WidthMismatch);
                el.block(&mut blocked, i, i, Block::WidthMismatch);
            }
            Coupling::Opaque => {
                ins.iter()
                    .for_each(|&j| el.block(&mut blocked, j, i, Block::Opaque));
                el.block(&mut blocked, i, i, Block::Opaque);
            }
        }
    }
    // Nodes sharing one weight keep the same channels on both of its axes.
    for (i, node) in g.nodes.iter().enumerate() {
        if node.shares.is_none() {
            continue;
        }
        let j = g.param_owner(i);
        if j == i {
            continue;
        }
        if ch[i] == ch[j] {
            el.pair(&mut uf, j, i, ch[i]);
        }
        if let (Some(&a), Some(&b)) = (g.nodes[j].inputs.first(), node.inputs.first()) {
            if ch[a] == ch[b] {
                el.pair(&mut uf, a, b, ch[a]);
            }
        }
    }
    for &o in &g.outputs {
        el.block(&mut blocked, o, o, Block::Output);
    }
    (uf, blocked)
}

/// Units are the classes of coupled elements; returns them and each element's unit.
fn units(el: &Elements, uf: &mut Uf, blocked: &[Blocked]) -> (Vec<Unit>, Vec<usize>) {
    let mut class_of_root: BTreeMap<usize, usize> = BTreeMap::new();
    let mut units: Vec<Unit> = Vec::new();
    let mut unit_of = vec![0usize; el.total()];
    for (node, &width) in el.ch.iter().enumerate() {
        for c in 0..width {
            let x = el.e(node, c);
            let r = uf.find(x);
            let u = *class_of_root.entry(r).or_insert_with(|| {
                units.push(Unit {
                    elems: Vec::new(),
                    blocked: false,
                    blocked_by: None,
                });
                units.len() - 1
            });
            units[u].elems.push((node, c));
            if let Some(b) = blocked[x] {
                units[u].blocked = true;
                units[u].blocked_by.get_or_insert(b);
            }
            unit_of[x] = u;
        }
    }
    (units, unit_of)
}

/// Groups are the units that share a node. Returns the groups (with their nodes, no
/// members yet) and, per node and channel, the (group, unit-in-group) that owns it.
#[allow(clippy::type_complexity)]
fn group_units(
    el: &Elements,
    units: Vec<Unit>,
    unit_of: &[usize],
) -> (Vec<Group>, Vec<Vec<(usize, usize)>>) {
    let (n, ch) = (el.nodes(), &el.ch);
    let mut guf = Uf {
        parent: (0..units.len()).collect(),
    };
    for node in 0..n {
        for c in 1..ch[node] {
            guf.union(unit_of[el.e(node, 0)], unit_of[el.e(node, c)]);
        }
    }
    let mut group_of_root: BTreeMap<usize, usize> = BTreeMap::new();
    let mut groups: Vec<Group> = Vec::new();
    let mut unit_pos = vec![(0usize, 0usize); units.len()];
    for (u, unit) in units.into_iter().enumerate() {
        let r = guf.find(u);
        let gi = *group_of_root.entry(r).or_insert_with(|| {
            groups.push(Group {
                units: Vec::new(),
                nodes: Vec::new(),
                members: Vec::new(),
            });
            groups.len() - 1
        });
        unit_pos[u] = (gi, groups[gi].units.len());
        groups[gi].units.push(unit);
    }
    let owner: Vec<Vec<(usize, usize)>> = (0..n)
        .map(|node| {
            (0..ch[node])
                .map(|c| unit_pos[unit_of[el.e(node, c)]])
                .collect()
        })
        .collect();
    for (gi, grp) in groups.iter_mut().enumerate() {
        grp.nodes = (0..n)
            .filter(|&node| ch[node] > 0 && owner[node][0].0 == gi)
            .collect();
    }
    (groups, owner)
}

/// Members: the output axes of each node's parameters, indexed by its own channels, and
/// the input axes, indexed by its input's channels (a conv or linear consumer).
fn members(g: &Graph, ch: &[usize], owner: &[Vec<(usize, usize)>]) -> Vec<Member> {
    let mut out = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        for p in node.op.spec().params() {
            let axes = [
                (p.out_axis, i),
                (p.in_axis, node.inputs.first().copied().unwrap_or(i)),
            ];
            for (axis, indexed_by) in axes {
                if let (Some(axis), true) = (axis, ch[indexed_by] > 0) {
                    debug_assert!(!owner[indexed_by].is_empty());
                    out.push(Member {
                        node: i,
                        param: p.name,
                        axis,
                        indexed_by,
                    });
                }
            }
        }
    }
    out
}

/// A group that cannot be pruned fully, and what holds it: for reports and for the
/// impossible-budget error.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlockedGroup {
    /// The first few nodes of the group (by name).
    pub nodes: Vec<String>,
    pub width: usize,
    /// Units that may not be removed.
    pub blocked_units: usize,
    /// Each distinct blocking rule: "node (op): why".
    pub by: Vec<String>,
}

/// The groups with blocked units whose other nodes hold parameters (so blocking them
/// costs something), each with the rules that block it.
pub fn blocked_groups(g: &Graph, groups: &Groups) -> Vec<BlockedGroup> {
    let mut out = Vec::new();
    for grp in &groups.groups {
        let blocked = grp.units.iter().filter(|u| u.blocked).count();
        if blocked == 0 || grp.members.is_empty() {
            continue;
        }
        let mut by: Vec<String> = Vec::new();
        for u in &grp.units {
            if let Some((n, why)) = u.blocked_by {
                let s = format!(
                    "{} ({}): {}",
                    g.nodes[n].name,
                    g.nodes[n].op.kind(),
                    why.describe()
                );
                if !by.contains(&s) {
                    by.push(s);
                }
            }
        }
        out.push(BlockedGroup {
            nodes: grp
                .nodes
                .iter()
                .take(3)
                .map(|&n| g.nodes[n].name.clone())
                .collect(),
            width: grp.units.len(),
            blocked_units: blocked,
            by,
        });
    }
    out
}
