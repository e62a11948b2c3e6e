//! ONNX import/export: the Model Zoo MNIST model scores exactly as onnxruntime does,
//! export → import reproduces every zoo model (dense and pruned), bad files are errors
//! (never panics), and mutated bytes never panic the importer.

use candle_core::{Device, Tensor};
use lopper::data::{self, Split};
use lopper::exec::{forward, Mode};
use lopper::graph::Graph;
use lopper::onnx::{export::export_bytes, import::import_bytes};
use lopper::prune::{dependency_groups, plan, remove_units, Budget, Criterion, PlanConfig, Scope};
use lopper::zoo;
use onnx_protobuf::{Message, ModelProto};
use proptest::prelude::*;

mod common;
use common::{randomise_bn, vals};

fn mnist8() -> Vec<u8> {
    std::fs::read(data::data_dir().join("models/mnist-8.onnx")).unwrap()
}

#[test]
fn mnist8_scores_9891_of_10000_on_raw_pixels() {
    let g = import_bytes(&mnist8(), "mnist-8.onnx").unwrap();
    let mut te = data::load("mnist", Split::Test, None).unwrap();
    (te.mean, te.std, te.max_value) = (vec![0.0], vec![1.0], 1.0);
    let ev = lopper::train::evaluate(&g, &te, 1000).unwrap();
    assert_eq!(ev.correct, 9891);
    assert_eq!(g.num_params(), 5994);
}

fn same_outputs(a: &Graph, b: &Graph, what: &str) {
    let mut dims = vec![3];
    dims.extend(a.input_shape());
    let x = Tensor::randn(0f32, 1., dims, &Device::Cpu).unwrap();
    let ya = vals(&forward(a, &x, Mode::Eval).unwrap());
    let yb = vals(&forward(b, &x, Mode::Eval).unwrap());
    assert_eq!(ya.len(), yb.len(), "{what}");
    for (p, q) in ya.iter().zip(&yb) {
        assert!(
            (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
            "{what}: {p} vs {q}"
        );
    }
}

#[test]
fn export_then_import_reproduces_zoo_models_dense_and_pruned() {
    for spec in [
        "mlp:64-48-10",
        "lenet5",
        "digit_cnn",
        "vgg11",
        "resnet20@3x16x16",
        "mobilenetv2@3x16x16",
    ] {
        let g = zoo::build(spec, 2).unwrap();
        randomise_bn(&g, 5);
        let back = import_bytes(&export_bytes(&g).unwrap(), spec).unwrap();
        same_outputs(&g, &back, spec);
        assert_eq!(back.num_params(), g.num_params(), "{spec}");
        let groups = dependency_groups(&g).unwrap();
        let cfg = PlanConfig {
            criterion: Criterion::L1,
            scope: Scope::Local,
            budget: Budget::Ratio(0.4),
            round_to: 1,
            lamp: false,
            overrides: vec![],
            seed: 0,
        };
        let p = remove_units(&g, &groups, &plan(&g, &groups, &cfg, None).unwrap()).unwrap();
        let back = import_bytes(&export_bytes(&p).unwrap(), spec).unwrap();
        same_outputs(&p, &back, &format!("pruned {spec}"));
        // Names survive: the exported graph keeps the IR node names.
        assert!(back
            .nodes
            .iter()
            .zip(&p.nodes)
            .all(|(a, b)| a.name == b.name));
    }
}

#[test]
fn malformed_truncated_and_unsupported_inputs_are_errors() {
    let e = import_bytes(b"\xff\xff\xff\xff not onnx", "junk.onnx").unwrap_err();
    assert!(format!("{e:#}").contains("junk.onnx"), "{e:#}");
    let bytes = mnist8();
    let e = import_bytes(&bytes[..bytes.len() / 2], "half.onnx").unwrap_err();
    assert!(format!("{e:#}").contains("half.onnx"), "{e:#}");
    // An unsupported op names the op type, the node and what is supported.
    let mut m = ModelProto::parse_from_bytes(&bytes).unwrap();
    let g = m.graph.as_mut().unwrap();
    let relu = g.node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
    relu.op_type = "Einsum".into();
    let name = relu.name.clone();
    let e = import_bytes(&m.write_to_bytes().unwrap(), "einsum.onnx").unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("Einsum") && msg.contains(&name) && msg.contains("supported: Conv"),
        "{msg}"
    );
    // An unsupported attribute is an error too, never ignored.
    let mut m = ModelProto::parse_from_bytes(&bytes).unwrap();
    let g = m.graph.as_mut().unwrap();
    let pool = g.node.iter_mut().find(|n| n.op_type == "MaxPool").unwrap();
    let mut a = onnx_protobuf::AttributeProto::new();
    a.name = "dilations".into();
    a.ints = vec![2, 2];
    a.type_ = onnx_protobuf::attribute_proto::AttributeType::INTS.into();
    pool.attribute.push(a);
    let msg = format!(
        "{:#}",
        import_bytes(&m.write_to_bytes().unwrap(), "dil.onnx").unwrap_err()
    );
    assert!(msg.contains("dilated pooling"), "{msg}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Mutated protobuf bytes: the importer returns Ok or Err, never panics.
    #[test]
    fn mutated_bytes_never_panic(
        edits in prop::collection::vec((0usize..6000, any::<u8>(), 0u8..3), 1..8),
        cut in prop::option::of(0usize..30000),
    ) {
        let mut b = mnist8();
        common::mutate(&mut b, &edits, cut);
        let _ = import_bytes(&b, "fuzz.onnx");
    }
}

/// The README's op table is the registry's: regenerated with `LOPPER_BLESS=1`.
#[test]
fn readme_op_table_is_generated_from_the_registry() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = ("<!-- onnx-ops:begin -->\n", "<!-- onnx-ops:end -->");
    let a = readme.find(begin).expect("README has the op table markers") + begin.len();
    let b = readme.find(end).expect("README has the end marker");
    let table = lopper::onnx::import::registry::markdown_table();
    if std::env::var_os("LOPPER_BLESS").is_some() {
        let new = format!("{}{table}{}", &readme[..a], &readme[b..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    assert_eq!(
        readme[a..b],
        table,
        "README op table is stale: run LOPPER_BLESS=1 cargo test --release --test onnx readme"
    );
}
