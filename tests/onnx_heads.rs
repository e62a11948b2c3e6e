//! Detection-style heads and multi-input graphs: a data-moving transpose, concatenation
//! along a non-channel axis, softmax over the last axis, element-wise max/min, and a graph
//! with two inputs — each checked against an index-level reference, through export →
//! import, through a training step, and through pruning (the head's reshuffled channels
//! block only their own group).

use candle_core::{Device, Tensor};
use lopper::exec::{Feeds, Mode, Plan, PlanOpts};
use lopper::graph::builder::GraphBuilder;
use lopper::graph::ops::{Concat, Conv2d, Input, Max, Min, Op, Reshape, Softmax, Transpose};
use lopper::graph::Graph;
use lopper::onnx::{export::export_bytes, import::import_bytes};
use lopper::prune::dependency_groups;

mod common;
use common::{l1_half, max_diff, vals};

const A: usize = 3; // anchors per position
const K: usize = 4; // values per anchor

/// Two levels (8×8 and 4×4) of a head: conv → [A, K, H, W] → transpose to [H, W, A, K] →
/// [H·W·A, K], concatenated along anchors, softmax over K. The levels' features are fused
/// with max and min first.
fn head() -> Graph {
    let mut b = GraphBuilder::new(3);
    let x = b.input(&[3, 8, 8]).unwrap();
    let c1 = b.conv("c1", x, Conv2d::new(3, 16, 3, 1, 1)).unwrap();
    let r1 = b.relu(c1).unwrap();
    let c2 = b.conv("c2", r1, Conv2d::new(16, 16, 3, 1, 1)).unwrap();
    let c3 = b.conv("c3", r1, Conv2d::new(16, 16, 1, 1, 0)).unwrap();
    let mx = b.add("max", Op::Max(Max {}), &[c2, c3]).unwrap();
    let mn = b.add("min", Op::Min(Min {}), &[c2, c3]).unwrap();
    let f1 = b.add_nodes(mx, mn).unwrap();
    let down = b.conv("down", f1, Conv2d::new(16, 16, 3, 2, 1)).unwrap();
    let mut levels = Vec::new();
    for (k, (f, hw)) in [(f1, 8usize), (down, 4)].into_iter().enumerate() {
        let h = b
            .conv(&format!("head{k}"), f, Conv2d::new(16, A * K, 1, 1, 0))
            .unwrap();
        let v = b
            .auto(
                Op::Reshape(Reshape {
                    shape: vec![A as i64, K as i64, hw as i64, hw as i64],
                }),
                &[h],
            )
            .unwrap();
        let t = b
            .add(
                &format!("perm{k}"),
                Op::Transpose(Transpose {
                    perm: vec![2, 3, 0, 1],
                }),
                &[v],
            )
            .unwrap();
        let flat = b
            .auto(
                Op::Reshape(Reshape {
                    shape: vec![-1, K as i64],
                }),
                &[t],
            )
            .unwrap();
        levels.push(flat);
    }
    let cat = b
        .add("anchors", Op::Concat(Concat { axis: 0 }), &levels)
        .unwrap();
    let sm = b
        .add("scores", Op::Softmax(Softmax { axis: 1 }), &[cat])
        .unwrap();
    b.finish(&[sm, cat]).unwrap()
}

fn run(g: &Graph, xs: &[&Tensor]) -> Vec<Vec<f32>> {
    let p = Plan::new(g, Mode::Eval, &PlanOpts::default()).unwrap();
    p.run_inputs(g, xs, &Feeds::default())
        .unwrap()
        .outputs
        .iter()
        .map(vals)
        .collect()
}

#[test]
fn a_detection_head_matches_its_index_definition() {
    let g = head();
    let shapes = g.shapes().unwrap();
    assert_eq!(shapes[g.outputs[0]], vec![(64 + 16) * A, K]);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let out = run(&g, &[&x]);
    // The raw head maps, read directly.
    let keep: Vec<usize> = ["head0", "head1", "max", "min", "c2", "c3"]
        .iter()
        .map(|n| g.node_id(n).unwrap())
        .collect();
    let mut o = lopper::exec::ForwardOpts::new(Mode::Eval);
    o.keep = &keep;
    let kept = lopper::exec::forward_with(&g, &x, &o).unwrap().kept;
    let (m0, m1) = (vals(&kept[&keep[0]]), vals(&kept[&keep[1]]));
    let rows = (64 + 16) * A;
    for n in 0..2 {
        let mut row = 0;
        for (m, hw) in [(&m0, 8usize), (&m1, 4)] {
            for y in 0..hw {
                for xx in 0..hw {
                    for a in 0..A {
                        let logits: Vec<f32> = (0..K)
                            .map(|k| m[((n * A * K + a * K + k) * hw + y) * hw + xx])
                            .collect();
                        let z: f32 = logits.iter().map(|v| v.exp()).sum();
                        for (k, &l) in logits.iter().enumerate() {
                            let at = (n * rows + row) * K + k;
                            assert!((out[1][at] - l).abs() < 1e-6, "concat {n},{row},{k}");
                            assert!(
                                (out[0][at] - l.exp() / z).abs() < 1e-5,
                                "softmax {n},{row},{k}"
                            );
                        }
                        row += 1;
                    }
                }
            }
        }
    }
    let (a, b) = (vals(&kept[&keep[4]]), vals(&kept[&keep[5]]));
    let (mx, mn) = (vals(&kept[&keep[2]]), vals(&kept[&keep[3]]));
    for i in 0..a.len() {
        assert_eq!(mx[i], a[i].max(b[i]));
        assert_eq!(mn[i], a[i].min(b[i]));
    }
    // Export → import keeps every value.
    let back = import_bytes(&export_bytes(&g).unwrap(), "head").unwrap();
    for (p, q) in run(&back, &[&x]).iter().zip(&out) {
        assert!(max_diff(p, q) < 1e-6);
    }
}

#[test]
fn a_detection_head_trains_and_prunes_everything_but_its_reshuffled_maps() {
    let g = head();
    // A training step: gradients flow through the transpose, max, min and concat.
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let y = lopper::exec::forward(&g, &x, Mode::Train).unwrap();
    let loss = y.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let got: Vec<String> = g
        .trainable()
        .into_iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
        .map(|(k, _)| k)
        .collect();
    for name in ["c1", "c2", "c3", "down", "head0", "head1"] {
        let w = g.param(g.node_id(name).unwrap(), "weight").unwrap();
        let gw = grads
            .get(w.as_tensor())
            .unwrap_or_else(|| panic!("{name}: gradients only for {got:?}"));
        let s: f32 = gw.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s > 0.0, "no gradient reaches {name}");
    }
    // Pruning: the trunk's channels are prunable; the heads' (moved by the transpose)
    // are blocked, and the report says by which op.
    let groups = dependency_groups(&g).unwrap();
    let group_of = |name: &str| {
        let id = g.node_id(name).unwrap();
        groups
            .groups
            .iter()
            .find(|gr| gr.nodes.contains(&id))
            .unwrap()
    };
    assert!(!group_of("c1").prunable_units().is_empty());
    assert!(!group_of("max").prunable_units().is_empty());
    assert!(group_of("head0").prunable_units().is_empty());
    let blocked = format!("{:?}", lopper::prune::blocked_groups(&g, &groups));
    assert!(
        blocked.contains("head0") && blocked.contains("cannot be followed"),
        "{blocked}"
    );
    let (_, small) = l1_half(&g, &groups);
    let shapes = small.shapes().unwrap();
    assert_eq!(shapes[small.outputs[0]], vec![(64 + 16) * A, K]);
    let before = lopper::graph::cost::cost(&g).unwrap().total_macs;
    let after = lopper::graph::cost::cost(&small).unwrap().total_macs;
    assert!(after < before * 3 / 4, "{after} of {before} MACs");
    let back = import_bytes(&export_bytes(&small).unwrap(), "pruned head").unwrap();
    for (p, q) in run(&back, &[&x]).iter().zip(run(&small, &[&x])) {
        assert!(max_diff(p, &q) < 1e-6);
    }
}

/// An image and a half-resolution depth map, one stem each, concatenated.
fn two_inputs() -> Graph {
    let mut b = GraphBuilder::new(5);
    let x = b.input(&[3, 8, 8]).unwrap();
    let d = b
        .add(
            "depth",
            Op::Input(Input {
                shape: vec![1, 4, 4],
            }),
            &[],
        )
        .unwrap();
    let cx = b.conv("cx", x, Conv2d::new(3, 8, 3, 2, 1)).unwrap();
    let cd = b.conv("cd", d, Conv2d::new(1, 4, 3, 1, 1)).unwrap();
    let cat = b.concat(&[cx, cd]).unwrap();
    let r = b.relu(cat).unwrap();
    let t = b.conv("trunk", r, Conv2d::new(12, 8, 3, 1, 1)).unwrap();
    let p = b.gap(t).unwrap();
    let f = b.flatten(p).unwrap();
    let fc = b.linear("fc", f, 8, 5).unwrap();
    b.finish(&[fc]).unwrap()
}

#[test]
fn two_input_graphs_run_round_trip_and_prune() {
    let g = two_inputs();
    assert_eq!(g.input_ids().len(), 2);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let d = Tensor::randn(0f32, 1.0, (2, 1, 4, 4), &Device::Cpu).unwrap();
    let y = run(&g, &[&x, &d]);
    // The depth input matters, and one input alone is a clear error.
    let d0 = d.zeros_like().unwrap();
    assert!(max_diff(&run(&g, &[&x, &d0])[0], &y[0]) > 1e-4);
    let p = Plan::new(&g, Mode::Eval, &PlanOpts::default()).unwrap();
    let e = p.run(&g, &x, &Feeds::default()).unwrap_err().to_string();
    assert!(e.contains("2 inputs (input, depth); 1 given"), "{e}");
    let e = p
        .run_inputs(&g, &[&d, &x], &Feeds::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("input 'input' has shape"), "{e}");
    // Export keeps both inputs, in order, with their names.
    let bytes = export_bytes(&g).unwrap();
    let back = import_bytes(&bytes, "two inputs").unwrap();
    let names: Vec<&str> = back
        .input_ids()
        .iter()
        .map(|&i| back.nodes[i].name.as_str())
        .collect();
    assert_eq!(names, ["input", "depth"]);
    assert!(max_diff(&run(&back, &[&x, &d])[0], &y[0]) < 1e-6);
    // Both stems prune (each input's own channels stay).
    let groups = dependency_groups(&g).unwrap();
    let (_, small) = l1_half(&g, &groups);
    let s = small.shapes().unwrap();
    let (cx, cd) = (
        s[small.node_id("cx").unwrap()][0],
        s[small.node_id("cd").unwrap()][0],
    );
    assert!(cx + cd < 12, "{cx} + {cd} channels kept of 12");
    assert!(s[small.node_id("trunk").unwrap()][0] < 8);
    let back = import_bytes(&export_bytes(&small).unwrap(), "pruned").unwrap();
    assert!(max_diff(&run(&back, &[&x, &d])[0], &run(&small, &[&x, &d])[0]) < 1e-6);
}

/// Import goes on past a node it cannot convert: every failing node is listed at once,
/// and the nodes that read a failed output are counted, not tried.
#[test]
fn every_failing_node_is_listed_at_once() {
    use onnx_protobuf::{AttributeProto, Message, ModelProto};
    let mut m = ModelProto::parse_from_bytes(&export_bytes(&head()).unwrap()).unwrap();
    for n in m.graph.as_mut().unwrap().node.iter_mut() {
        if n.name == "c2" || n.name == "c3" {
            let mut a = AttributeProto::new();
            a.name = format!("{}_extra", n.name);
            n.attribute.push(a);
        }
    }
    let e = format!(
        "{:#}",
        import_bytes(&m.write_to_bytes().unwrap(), "two-bad.onnx").unwrap_err()
    );
    assert!(e.contains("2 node(s) cannot be imported"), "{e}");
    assert!(e.contains("'c2'") && e.contains("c2_extra"), "{e}");
    assert!(e.contains("'c3'") && e.contains("c3_extra"), "{e}");
    assert!(e.contains("not tried"), "{e}");
}

/// The head graph with `head1` reading `head0`'s weight and bias initialisers, as a
/// RetinaNet-style exporter writes a head shared by every level.
fn shared_head_onnx() -> Vec<u8> {
    use onnx_protobuf::{Message, ModelProto};
    let mut m = ModelProto::parse_from_bytes(&export_bytes(&head()).unwrap()).unwrap();
    let g = m.graph.as_mut().unwrap();
    for n in g.node.iter_mut().filter(|n| n.name == "head1") {
        for i in n.input.iter_mut().skip(1) {
            *i = i.replace("head1.", "head0.");
        }
    }
    g.initializer.retain(|t| !t.name.starts_with("head1."));
    m.write_to_bytes().unwrap()
}

#[test]
fn a_weight_read_by_two_convs_stays_one_parameter_through_training_pruning_and_export() {
    use onnx_protobuf::{Message, ModelProto};
    let g = import_bytes(&shared_head_onnx(), "shared").unwrap();
    let (h0, h1) = (g.node_id("head0").unwrap(), g.node_id("head1").unwrap());
    assert_eq!(g.nodes[h1].shares.as_deref(), Some("head0"));
    assert_eq!(g.param_owner(h1), h0);
    // One variable: counted once, trained once.
    let dense = import_bytes(&export_bytes(&head()).unwrap(), "separate").unwrap();
    let per_head: u64 = dense
        .params()
        .iter()
        .filter(|(k, _)| k.starts_with("head1."))
        .map(|(_, v)| v.elem_count() as u64)
        .sum();
    assert!(per_head >= (A * K * 16) as u64);
    assert_eq!(
        lopper::graph::cost::cost(&dense).unwrap().total_params
            - lopper::graph::cost::cost(&g).unwrap().total_params,
        per_head
    );
    assert!(!g.trainable().iter().any(|(k, _)| k.starts_with("head1.")));
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let y = lopper::exec::forward(&g, &x, Mode::Train).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let w0 = g.param(h0, "weight").unwrap();
    assert!(grads.get(w0.as_tensor()).is_some());
    let bumped = (w0.as_tensor() + 0.5).unwrap();
    w0.set(&bumped).unwrap();
    assert_eq!(
        vals(g.param(h1, "weight").unwrap().as_tensor()),
        vals(&bumped),
        "the second use does not see the update"
    );
    // Saved and loaded, copied: still shared.
    let dir = common::fresh_dir("shared-weights", "io");
    let path = dir.join("m.safetensors");
    lopper::graph::io::save(&g, &path).unwrap();
    let back = lopper::graph::io::load(&path).unwrap();
    assert_eq!(back.nodes[h1].shares.as_deref(), Some("head0"));
    assert_eq!(run(&back, &[&x]), run(&g, &[&x]));
    let c = g.deep_clone().unwrap();
    c.param(h0, "weight")
        .unwrap()
        .set(&(bumped.clone() * 2.0).unwrap())
        .unwrap();
    assert_eq!(
        vals(c.param(h1, "weight").unwrap().as_tensor()),
        vals(&(bumped * 2.0).unwrap())
    );
    assert_ne!(
        run(&c, &[&x]),
        run(&g, &[&x]),
        "the copy aliases the original"
    );
    // Pruning: both uses' inputs are one group, so the shared weight loses the same
    // input channels at both levels.
    let groups = dependency_groups(&g).unwrap();
    let (i0, i1) = (g.nodes[h0].inputs[0], g.nodes[h1].inputs[0]);
    let same_group = groups
        .groups
        .iter()
        .any(|gr| gr.nodes.contains(&i0) && gr.nodes.contains(&i1));
    assert!(same_group, "the shared conv's two inputs are not coupled");
    let (_, small) = l1_half(&g, &groups);
    let (s0, s1) = (
        small.node_id("head0").unwrap(),
        small.node_id("head1").unwrap(),
    );
    assert_eq!(small.nodes[s1].shares.as_deref(), Some("head0"));
    assert!(small.param(s0, "weight").unwrap().dims()[1] < 16);
    // Export writes one initialiser, and the result reads back with the same outputs.
    let bytes = export_bytes(&small).unwrap();
    let m = ModelProto::parse_from_bytes(&bytes).unwrap();
    let inits = &m.graph.as_ref().unwrap().initializer;
    assert!(!inits.iter().any(|t| t.name.starts_with("head1.")));
    let back = import_bytes(&bytes, "pruned shared").unwrap();
    assert_eq!(
        back.nodes[back.node_id("head1").unwrap()].shares.as_deref(),
        Some("head0")
    );
    for (p, q) in run(&back, &[&x]).iter().zip(run(&small, &[&x])) {
        assert!(max_diff(p, &q) < 1e-6);
    }
}
