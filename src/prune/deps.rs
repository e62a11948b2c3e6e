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

use crate::graph::ops::{Coupling, Op};
use crate::graph::shape::numel;
use crate::graph::{Graph, NodeId};
use anyhow::Result;
use std::collections::BTreeMap;

/// One removable channel: every (node, output index) it occupies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub elems: Vec<(NodeId, usize)>,
    /// True if any element is blocked (input, output, opaque): never removed.
    pub blocked: bool,
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
pub fn dependency_groups(g: &Graph) -> Result<Groups> {
    let shapes = g.shapes()?;
    let n = g.nodes.len();
    let ch: Vec<usize> = shapes
        .iter()
        .map(|s| s.first().copied().unwrap_or(1))
        .collect();
    let mut off = vec![0usize; n + 1];
    for i in 0..n {
        off[i + 1] = off[i] + ch[i];
    }
    let e = |node: usize, c: usize| off[node] + c;
    let mut uf = Uf {
        parent: (0..off[n]).collect(),
    };
    let mut blocked = vec![false; off[n]];
    let block = |blocked: &mut Vec<bool>, node: usize| {
        blocked[off[node]..off[node + 1]]
            .iter_mut()
            .for_each(|b| *b = true)
    };
    for (i, node) in g.nodes.iter().enumerate() {
        let ins = &node.inputs;
        match node.op.spec().coupling() {
            Coupling::Source => block(&mut blocked, i),
            Coupling::Decouple => {}
            Coupling::PassThrough => {
                if ch[ins[0]] == ch[i] {
                    (0..ch[i]).for_each(|c| uf.union(e(ins[0], c), e(i, c)));
                } else {
                    block(&mut blocked, ins[0]);
                    block(&mut blocked, i);
                }
            }
            Coupling::Grouped { groups } => {
                if groups == ch[ins[0]] && groups == ch[i] {
                    (0..ch[i]).for_each(|c| uf.union(e(ins[0], c), e(i, c)));
                } else {
                    // Grouped (not depthwise): widths must stay divisible per group.
                    block(&mut blocked, ins[0]);
                    block(&mut blocked, i);
                }
            }
            Coupling::Join => {
                for &j in ins {
                    if shapes[j].len() == shapes[i].len() && ch[j] == ch[i] {
                        (0..ch[i]).for_each(|c| uf.union(e(j, c), e(i, c)));
                    } else if numel(&shapes[j]) != 1 && ch[j] != 1 {
                        block(&mut blocked, j);
                        block(&mut blocked, i);
                    }
                }
            }
            Coupling::Concat => match &node.op {
                Op::ChannelPad(p) => {
                    (0..ch[ins[0]]).for_each(|c| uf.union(e(ins[0], c), e(i, p.before + c)))
                }
                _ => {
                    let mut o = 0;
                    for &j in ins {
                        (0..ch[j]).for_each(|c| uf.union(e(j, c), e(i, o + c)));
                        o += ch[j];
                    }
                }
            },
            Coupling::Gather => {
                if let Op::ChannelGather(gth) = &node.op {
                    for (c, &src) in gth.indices.iter().enumerate() {
                        uf.union(e(ins[0], src), e(i, c));
                    }
                }
            }
            Coupling::Flatten { .. } => {
                let inner = numel(&shapes[ins[0]]) / ch[ins[0]].max(1);
                for c in 0..ch[ins[0]] {
                    (0..inner).for_each(|k| uf.union(e(ins[0], c), e(i, c * inner + k)));
                }
            }
            Coupling::Opaque => {
                ins.iter().for_each(|&j| block(&mut blocked, j));
                block(&mut blocked, i);
            }
        }
    }
    for &o in &g.outputs {
        block(&mut blocked, o);
    }
    // Units: classes of elements.
    let mut class_of_root: BTreeMap<usize, usize> = BTreeMap::new();
    let mut units: Vec<Unit> = Vec::new();
    let mut unit_of = vec![0usize; off[n]];
    for (node, &width) in ch.iter().enumerate() {
        for c in 0..width {
            let x = e(node, c);
            let r = uf.find(x);
            let u = *class_of_root.entry(r).or_insert_with(|| {
                units.push(Unit {
                    elems: Vec::new(),
                    blocked: false,
                });
                units.len() - 1
            });
            units[u].elems.push((node, c));
            units[u].blocked |= blocked[x];
            unit_of[x] = u;
        }
    }
    // Groups: units that share a node.
    let mut guf = Uf {
        parent: (0..units.len()).collect(),
    };
    for node in 0..n {
        for c in 1..ch[node] {
            guf.union(unit_of[e(node, 0)], unit_of[e(node, c)]);
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
    let mut owner: Vec<Vec<(usize, usize)>> = (0..n).map(|i| vec![(0, 0); ch[i]]).collect();
    for node in 0..n {
        for c in 0..ch[node] {
            owner[node][c] = unit_pos[unit_of[e(node, c)]];
        }
    }
    for (gi, grp) in groups.iter_mut().enumerate() {
        grp.nodes = (0..n)
            .filter(|&node| ch[node] > 0 && owner[node][0].0 == gi)
            .collect();
    }
    // Members: output axes of each node in the group, and input axes of conv/linear
    // consumers of those nodes.
    for (i, node) in g.nodes.iter().enumerate() {
        for p in node.op.spec().params() {
            // An output axis is indexed by this node's channels, an input axis by its input's.
            let axes = [
                (p.out_axis, i),
                (p.in_axis, node.inputs.first().copied().unwrap_or(i)),
            ];
            for (axis, indexed_by) in axes {
                if let (Some(axis), true) = (axis, ch[indexed_by] > 0) {
                    groups[owner[indexed_by][0].0].members.push(Member {
                        node: i,
                        param: p.name,
                        axis,
                        indexed_by,
                    });
                }
            }
        }
    }
    Ok(Groups {
        groups,
        channels: ch,
        owner,
    })
}
