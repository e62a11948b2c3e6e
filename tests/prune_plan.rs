//! Criteria, scopes and budgets: MACs targets are met against the cost model, data-driven
//! criteria run on real data, and impossible requests are clear errors.

use lopper::data::{self, Split};
use lopper::graph::cost::cost;
use lopper::prune::{
    collect_stats, dependency_groups, plan, predict_cost, remove_units, Budget, Criterion,
    PlanConfig, Scope,
};
use lopper::zoo;

fn cfg(criterion: Criterion, scope: Scope, budget: Budget) -> PlanConfig {
    PlanConfig {
        criterion,
        scope,
        budget,
        round_to: 1,
        lamp: false,
        overrides: vec![],
        seed: 0,
    }
}

#[test]
fn macs_budget_is_met_for_every_weight_criterion_and_scope() {
    let g = zoo::build("resnet20", 0).unwrap();
    let groups = dependency_groups(&g).unwrap();
    let dense = cost(&g).unwrap().total_macs as f64;
    for crit in [
        Criterion::Random,
        Criterion::L1,
        Criterion::L2,
        Criterion::Fpgm,
        Criterion::BnScale,
    ] {
        for scope in [Scope::Local, Scope::Global] {
            let r = plan(&g, &groups, &cfg(crit, scope, Budget::Macs(0.5)), None).unwrap();
            let pred = predict_cost(&g, &groups, &r).unwrap().total_macs as f64 / dense;
            assert!(pred <= 0.5 && pred > 0.42, "{crit:?} {scope:?}: {pred}");
            let p = remove_units(&g, &groups, &r).unwrap();
            assert_eq!(cost(&p).unwrap().total_macs as f64 / dense, pred);
        }
    }
}

#[test]
fn lamp_round_to_and_overrides() {
    let g = zoo::build("vgg11", 0).unwrap();
    let groups = dependency_groups(&g).unwrap();
    let mut c = cfg(Criterion::L1, Scope::Global, Budget::Macs(0.5));
    c.lamp = true;
    let r = plan(&g, &groups, &c, None).unwrap();
    assert!(
        predict_cost(&g, &groups, &r).unwrap().total_macs as f64
            <= 0.5 * cost(&g).unwrap().total_macs as f64
    );
    let mut c = cfg(Criterion::L1, Scope::Local, Budget::Ratio(0.3));
    c.round_to = 8;
    c.overrides = vec![("features.conv0".into(), 0.75)];
    let p = remove_units(&g, &groups, &plan(&g, &groups, &c, None).unwrap()).unwrap();
    for n in &p.nodes {
        if let lopper::graph::Op::Conv2d(conv) = &n.op {
            assert_eq!(
                conv.out_channels % 8,
                0,
                "{} = {}",
                n.name,
                conv.out_channels
            );
            if n.name == "features.conv0" {
                assert_eq!(conv.out_channels, 16);
            }
        }
    }
    c.overrides = vec![("nope".into(), 0.5)];
    let e = plan(&g, &groups, &c, None).unwrap_err().to_string();
    assert!(e.contains("unknown layer 'nope'"), "{e}");
}

#[test]
fn impossible_budget_names_the_floor() {
    let g = zoo::build("resnet20", 0).unwrap();
    let groups = dependency_groups(&g).unwrap();
    let e = plan(
        &g,
        &groups,
        &cfg(Criterion::L1, Scope::Local, Budget::Macs(0.001)),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("impossible") && e.contains("leaves"), "{e}");
    let e = plan(
        &g,
        &groups,
        &cfg(Criterion::L1, Scope::Local, Budget::Ratio(1.0)),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("[0, 1)"), "{e}");
}

#[test]
fn data_driven_criteria_run_on_real_data() {
    let tr = data::load("digits", Split::Train, None).unwrap();
    let g = zoo::build("resnet8@1x8x8", 0).unwrap();
    let stats = collect_stats(&g, &tr, 128, 64).unwrap();
    assert!(!stats.grads.is_empty() && !stats.apoz.is_empty());
    let groups = dependency_groups(&g).unwrap();
    for crit in [Criterion::Taylor, Criterion::ActMean, Criterion::Apoz] {
        let r = plan(
            &g,
            &groups,
            &cfg(crit, Scope::Global, Budget::Macs(0.6)),
            Some(&stats),
        )
        .unwrap();
        let p = remove_units(&g, &groups, &r).unwrap();
        assert!(
            cost(&p).unwrap().total_macs as f64 <= 0.6 * cost(&g).unwrap().total_macs as f64,
            "{crit:?}"
        );
    }
    let e = plan(
        &g,
        &groups,
        &cfg(Criterion::Taylor, Scope::Local, Budget::Ratio(0.3)),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("needs data"), "{e}");
}

/// Taylor scores need gradients through an eval-mode pass: the inference-only fusions
/// (batch norm folded into convs) must not cut them.
#[test]
fn collected_gradients_reach_every_conv_weight() {
    let g = lopper::zoo::build("resnet8@3x8x8", 1).unwrap();
    let n = 32;
    let px: Vec<u8> = (0..n * 3 * 64).map(|i| (i * 37 % 251) as u8).collect();
    let data = lopper::data::Dataset::new(
        "synthetic",
        px,
        (0..n).map(|i| (i % 10) as u16).collect(),
        [3, 8, 8],
        255.0,
        vec![0.5; 3],
        vec![0.25; 3],
        (0..10).map(|i| i.to_string()).collect(),
    )
    .unwrap();
    let st = lopper::prune::collect_stats(&g, &data, n, 16).unwrap();
    for k in g.params().keys() {
        if k.contains("conv") && k.ends_with(".weight") {
            let gr = st
                .grads
                .get(k)
                .unwrap_or_else(|| panic!("no gradient for {k}"));
            assert!(gr.iter().any(|v| *v != 0.0), "zero gradient for {k}");
        }
    }
}
