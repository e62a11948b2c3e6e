//! Property tests of dependency groups and surgery over every zoo model: removing nothing
//! is exact; removing random valid channel sets in every group equals the dense network
//! masked at its consumers, and the pruned MACs equal the cost model's prediction.

use candle_core::{Device, Tensor};
use lopper::exec::{forward, forward_with, ForwardOpts, Mode};
use lopper::graph::cost::cost;
use lopper::graph::Graph;
use lopper::prune::{consumer_masks, dependency_groups, predict_cost, remove_units, Removal};
use lopper::zoo;

mod common;
use common::{randomise_bn, vals};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

const MODELS: &[&str] = &[
    "mlp:64-48-32-10",
    "lenet5",
    "digit_cnn",
    "vgg11",
    "resnet20@3x16x16",
    "resnet56@3x8x8",
    "mobilenetv2@3x16x16",
    "vit:32-2-4-4@3x16x16",
    "vit:32-2-4-4-2-cls@3x16x16",
];

/// Concat, squeeze-excitation (broadcast Mul), depthwise conv, flatten->linear: the
/// couplings the zoo's plain chains do not exercise.
/// ShuffleNet-style unit: split by channel gathers, a branch, concat, a channel shuffle
/// (permutation gather) and a per-channel affine — the ops ONNX import produces.
fn split_shuffle_net() -> Graph {
    use lopper::graph::ops::{ChannelAffine, ChannelGather, Conv2d, Op};
    use lopper::graph::GraphBuilder;
    let mut b = GraphBuilder::new(9);
    let x = b.input(&[3, 8, 8]).unwrap();
    let a = b.conv("a", x, Conv2d::new(3, 8, 3, 1, 1)).unwrap();
    let a = b.bn("a_bn", a).unwrap();
    let a = b.relu(a).unwrap();
    let gather = |idx: Vec<usize>| {
        Op::ChannelGather(ChannelGather {
            in_channels: 8,
            indices: idx,
        })
    };
    let left = b.add("left", gather((0..4).collect()), &[a]).unwrap();
    let right = b.add("right", gather((4..8).collect()), &[a]).unwrap();
    let r = b.conv("r", right, Conv2d::new(4, 4, 3, 1, 1)).unwrap();
    let r = b.bn("r_bn", r).unwrap();
    let r = b.relu(r).unwrap();
    let cat = b.concat(&[left, r]).unwrap();
    let shuffled = b
        .add(
            "shuffle",
            gather((0..8).map(|c| (c % 2) * 4 + c / 2).collect()),
            &[cat],
        )
        .unwrap();
    let aff = b
        .add(
            "affine",
            Op::ChannelAffine(ChannelAffine { channels: 8 }),
            &[shuffled],
        )
        .unwrap();
    let y = b.conv("c", aff, Conv2d::new(8, 6, 3, 2, 1)).unwrap();
    let y = b.gap(y).unwrap();
    let y = b.flatten(y).unwrap();
    let y = b.linear("fc", y, 6, 10).unwrap();
    b.finish(&[y]).unwrap()
}

fn concat_se_net() -> Graph {
    use lopper::graph::ops::{ActivationKind, Conv2d};
    use lopper::graph::GraphBuilder;
    let mut b = GraphBuilder::new(7);
    let x = b.input(&[3, 8, 8]).unwrap();
    let a = b.conv("a", x, Conv2d::new(3, 8, 3, 1, 1)).unwrap();
    let a = b.bn("a_bn", a).unwrap();
    let a = b.relu(a).unwrap();
    let c = b
        .conv("b", x, Conv2d::new(3, 6, 1, 1, 0).with_bias(true))
        .unwrap();
    let cat = b.concat(&[a, c]).unwrap();
    let y = b.conv("c", cat, Conv2d::new(14, 12, 3, 1, 1)).unwrap();
    let y = b.bn("c_bn", y).unwrap();
    let y = b.relu(y).unwrap();
    let s = b.gap(y).unwrap();
    let s = b
        .conv("se1", s, Conv2d::new(12, 4, 1, 1, 0).with_bias(true))
        .unwrap();
    let s = b.relu(s).unwrap();
    let s = b
        .conv("se2", s, Conv2d::new(4, 12, 1, 1, 0).with_bias(true))
        .unwrap();
    let s = b.act(s, ActivationKind::Sigmoid).unwrap();
    let y = b.mul_nodes(y, s).unwrap();
    let y = b
        .conv("dw", y, Conv2d::new(12, 12, 3, 2, 1).with_groups(12))
        .unwrap();
    let y = b.bn("dw_bn", y).unwrap();
    let y = b.act(y, ActivationKind::HardSwish).unwrap();
    let y = b.flatten(y).unwrap();
    let y = b.linear("fc", y, 12 * 16, 10).unwrap();
    b.finish(&[y]).unwrap()
}

fn input(g: &Graph, n: usize, seed: u64) -> Tensor {
    let mut dims = vec![n];
    dims.extend(g.input_shape());
    let _ = seed;
    Tensor::randn(0f32, 1f32, dims, &Device::Cpu).unwrap()
}

#[test]
fn removing_nothing_reproduces_the_dense_outputs_exactly() {
    let mut cases: Vec<(String, Graph)> = MODELS
        .iter()
        .map(|n| (n.to_string(), zoo::build(n, 1).unwrap()))
        .collect();
    cases.push(("concat_se_net".into(), concat_se_net()));
    cases.push(("split_shuffle_net".into(), split_shuffle_net()));
    for (name, g) in cases {
        let groups = dependency_groups(&g).unwrap();
        let r = Removal::from_units(&g, &groups, &[]).unwrap();
        let p = remove_units(&g, &groups, &r).unwrap();
        let x = input(&g, 3, 0);
        assert_eq!(
            vals(&forward(&g, &x, Mode::Eval).unwrap()),
            vals(&forward(&p, &x, Mode::Eval).unwrap()),
            "{name}"
        );
        assert_eq!(cost(&g).unwrap().total_macs, cost(&p).unwrap().total_macs);
    }
}

#[test]
fn random_removals_equal_masked_dense_network_and_predicted_cost() {
    let mut rng = Pcg64::seed_from_u64(42);
    let mut cases: Vec<(String, Graph)> = MODELS
        .iter()
        .map(|n| (n.to_string(), zoo::build(n, 2).unwrap()))
        .collect();
    cases.push(("concat_se_net".into(), concat_se_net()));
    cases.push(("split_shuffle_net".into(), split_shuffle_net()));
    for (name, g) in &cases {
        let mut pruned_trials = 0;
        randomise_bn(g, 3);
        let groups = dependency_groups(g).unwrap();
        for trial in 0..3 {
            // In every prunable group, remove a random subset of its units (never all of a node).
            let mut units = Vec::new();
            for (gi, grp) in groups.groups.iter().enumerate() {
                let cand = grp.prunable_units();
                if cand.len() < 2 {
                    continue;
                }
                let k = rng.gen_range(0..cand.len());
                for &u in cand.iter().filter(|_| rng.gen_bool(0.4)).take(k) {
                    units.push((gi, u));
                }
            }
            let removal = match Removal::from_units(g, &groups, &units) {
                Ok(r) => r,
                Err(e) if format!("{e}").contains("every channel") => continue,
                Err(e) => panic!("{name}: {e:#}"),
            };
            let pruned = remove_units(g, &groups, &removal).unwrap();
            let masks = consumer_masks(g, &groups, &removal).unwrap();
            let x = input(g, 2, trial);
            let opts = ForwardOpts {
                input_masks: Some(&masks),
                ..ForwardOpts::new(Mode::Eval)
            };
            let dense = vals(&forward_with(g, &x, &opts).unwrap().outputs[0]);
            let small = vals(&forward(&pruned, &x, Mode::Eval).unwrap());
            let scale = dense.iter().map(|v| v.abs()).fold(1e-6f32, f32::max);
            for (a, b) in dense.iter().zip(&small) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale.max(1.0),
                    "{name} trial {trial}: {a} vs {b}"
                );
            }
            let predicted = predict_cost(g, &groups, &removal).unwrap();
            let actual = cost(&pruned).unwrap();
            assert_eq!(predicted.total_macs, actual.total_macs, "{name}");
            assert_eq!(predicted.total_params, actual.total_params, "{name}");
            if !units.is_empty() {
                assert!(
                    actual.total_macs < cost(g).unwrap().total_macs,
                    "{name} got smaller"
                );
                pruned_trials += 1;
            }
        }
        assert!(
            pruned_trials >= 2,
            "{name}: only {pruned_trials} trials removed anything"
        );
    }
}

#[test]
fn resnet_groups_couple_residual_streams_and_block_io() {
    let g = zoo::build("resnet20", 0).unwrap();
    let groups = dependency_groups(&g).unwrap();
    // The residual stream (option-A shortcuts tie the stages together) is one group that
    // contains every block's conv2 output and the classifier's input.
    let id = |n: &str| g.node_id(n).unwrap();
    let owner = |n: &str| groups.owner[id(n)][0].0;
    assert_eq!(owner("layer1.0.conv2"), owner("layer1.2.bn2"));
    assert_eq!(owner("layer1.0.conv2"), owner("layer3.2.conv2"));
    // Each block's inner width is its own group of 16/32/64 units.
    for (n, w) in [
        ("layer1.0.conv1", 16),
        ("layer2.1.conv1", 32),
        ("layer3.2.conv1", 64),
    ] {
        let grp = &groups.groups[owner(n)];
        assert_eq!(grp.units.len(), w, "{n}");
        assert_ne!(owner(n), owner("layer1.0.conv2"));
        assert!(grp
            .members
            .iter()
            .any(|m| g.nodes[m.node].name.ends_with("conv2") && m.axis == 1));
        assert!(grp.members.iter().any(|m| m.param == "running_var"));
    }
    // Classifier outputs and the network input are blocked.
    let fc = &groups.groups[owner("fc")];
    assert!(fc.units.iter().all(|u| u.blocked));
    let inp = &groups.groups[groups.owner[g.input_id()][0].0];
    assert!(inp.units.iter().all(|u| u.blocked));
}

#[test]
fn removing_every_channel_or_a_blocked_one_is_an_error() {
    let g = zoo::build("mlp:8-4-3", 0).unwrap();
    let groups = dependency_groups(&g).unwrap();
    let hidden = groups.owner[g.node_id("fc1").unwrap()][0].0;
    let all: Vec<(usize, usize)> = (0..4).map(|u| (hidden, u)).collect();
    let e = Removal::from_units(&g, &groups, &all)
        .unwrap_err()
        .to_string();
    assert!(e.contains("every channel") && e.contains("fc1"), "{e}");
    let out = groups.owner[g.node_id("fc2").unwrap()][0].0;
    let e = Removal::from_units(&g, &groups, &[(out, 0)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be pruned"), "{e}");
}
