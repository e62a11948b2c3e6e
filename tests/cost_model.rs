//! The cost model against published CIFAR figures (32x32 input, conv + linear MACs).

use lopper::graph::cost::cost;
use lopper::zoo;

fn within(actual: u64, expected: f64, tol: f64) -> bool {
    ((actual as f64 - expected) / expected).abs() <= tol
}

#[test]
fn resnet56_matches_published_macs_and_params() {
    let c = cost(&zoo::build("resnet56", 0).unwrap()).unwrap();
    assert!(
        within(c.total_macs, 125.49e6, 1e-3),
        "MACs {}",
        c.total_macs
    );
    assert!(
        within(c.total_params, 0.85e6, 1e-2),
        "params {}",
        c.total_params
    );
    // Exact conv+linear count: 125,485,696 MACs.
    assert_eq!(c.total_macs, 125_485_696);
}

#[test]
fn resnet20_matches_published_macs() {
    let c = cost(&zoo::build("resnet20", 0).unwrap()).unwrap();
    assert!(within(c.total_macs, 40.55e6, 1e-3), "MACs {}", c.total_macs);
    assert!(
        within(c.total_params, 0.27e6, 1e-2),
        "params {}",
        c.total_params
    );
}

#[test]
fn vgg16_matches_published_macs() {
    let c = cost(&zoo::build("vgg16", 0).unwrap()).unwrap();
    assert!(within(c.total_macs, 313.2e6, 1e-3), "MACs {}", c.total_macs);
}

#[test]
fn every_zoo_model_builds_with_consistent_shapes() {
    for name in [
        "mlp:784-1024-1024-10",
        "lenet5",
        "vgg11",
        "vgg16",
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet110",
        "mobilenetv2",
        "digit_cnn",
    ] {
        let g = zoo::build(name, 1).unwrap();
        let c = cost(&g).unwrap();
        assert!(c.total_macs > 0 && c.total_params > 0, "{name}");
        let out = g.shapes().unwrap()[g.outputs[0]].clone();
        assert_eq!(out, vec![10], "{name} output");
    }
}

#[test]
fn digit_cnn_has_the_published_parameter_count() {
    let c = cost(&zoo::build("digit_cnn", 0).unwrap()).unwrap();
    assert_eq!(c.total_params, 390_410);
}

#[test]
fn unknown_model_is_a_clear_error() {
    let e = zoo::build("resnet57", 0).unwrap_err();
    assert!(format!("{e:#}").contains("6n+2"), "{e:#}");
    let e = zoo::build("alexnet", 0).unwrap_err();
    assert!(
        format!("{e:#}").contains("unknown model 'alexnet'"),
        "{e:#}"
    );
}
