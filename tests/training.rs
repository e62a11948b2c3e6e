//! Training on real data: learning happens, runs are deterministic, resume is exact,
//! and the pretrained digit CNN reproduces its published accuracy.

use lopper::data::{self, Split};
use lopper::exec::Mode;
use lopper::graph::io;
use lopper::train::{self, TrainConfig, TrainOpts};
use lopper::zoo;
use std::path::PathBuf;

fn params_of(g: &lopper::graph::Graph) -> Vec<Vec<f32>> {
    g.params()
        .values()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn cfg(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 64,
        lr: 0.05,
        crop_pad: 1,
        ..Default::default()
    }
}

#[test]
fn resnet_on_digits_learns_and_is_deterministic() {
    let tr = data::load("digits", Split::Train, None).unwrap();
    let te = data::load("digits", Split::Test, None).unwrap();
    let run = || {
        let g = zoo::build("resnet8@1x8x8", 0).unwrap();
        train::train(&g, &tr, &cfg(4), &TrainOpts::default()).unwrap();
        g
    };
    let a = run();
    let b = run();
    assert_eq!(params_of(&a), params_of(&b), "same seed, same weights");
    let ev = train::evaluate(&a, &te, 100).unwrap();
    assert!(ev.top1 > 0.85, "digits accuracy {}", ev.top1);
}

#[test]
fn resumed_training_equals_uninterrupted_training() {
    let tr = data::load("digits", Split::Train, None).unwrap();
    let ck: PathBuf =
        std::env::temp_dir().join(format!("lopper-resume-{}.ckpt", std::process::id()));
    let _ = std::fs::remove_file(&ck);
    let straight = zoo::build("resnet8@1x8x8", 1).unwrap();
    train::train(&straight, &tr, &cfg(3), &TrainOpts::default()).unwrap();

    let g = zoo::build("resnet8@1x8x8", 1).unwrap();
    let opts = TrainOpts {
        checkpoint: Some(ck.clone()),
        stop_after: Some(1),
        ..Default::default()
    };
    train::train(&g, &tr, &cfg(3), &opts).unwrap();
    // A fresh process would rebuild the model; the checkpoint restores weights and optimizer.
    let resumed = zoo::build("resnet8@1x8x8", 99).unwrap();
    let opts = TrainOpts {
        checkpoint: Some(ck.clone()),
        ..Default::default()
    };
    let res = train::train(&resumed, &tr, &cfg(3), &opts).unwrap();
    assert_eq!(res.history.len(), 3);
    assert_eq!(params_of(&straight), params_of(&resumed));
    let _ = std::fs::remove_file(&ck);
}

/// A diverging loss is a clear error on the host path and on the device path (the GPU's,
/// here on the CPU), where it is raised at the next read-back instead of at once.
#[test]
fn nan_loss_is_a_clear_error() {
    let tr = data::load("digits", Split::Train, None).unwrap();
    let c = TrainConfig {
        lr: 1e30,
        weight_decay: 0.0,
        ..cfg(2)
    };
    for device_path in [false, true] {
        let g = zoo::build("mlp:64-32-10", 0).unwrap();
        let opts = TrainOpts {
            device_path,
            ..Default::default()
        };
        let e = format!("{:#}", train::train(&g, &tr, &c, &opts).unwrap_err());
        assert!(e.contains("loss became"), "device path {device_path}: {e}");
    }
}

#[test]
fn digit_recognizer_cnn_scores_exactly_9906_on_mnist() {
    let te = data::load("mnist", Split::Test, None).unwrap();
    let g = zoo::build("digit_cnn", 0).unwrap();
    io::load_weights(
        &g,
        &data::data_dir().join("models/digit_recognizer_cnn.safetensors"),
    )
    .unwrap();
    let ev = train::evaluate(&g, &te, 1000).unwrap();
    assert_eq!(ev.correct, 9906);
}

#[test]
fn lenet5_reaches_98_8_percent_on_mnist_in_3_epochs() {
    let tr = data::load("mnist", Split::Train, None).unwrap();
    let te = data::load("mnist", Split::Test, None).unwrap();
    let g = zoo::build("lenet5", 0).unwrap();
    let c = TrainConfig {
        epochs: 3,
        batch_size: 64,
        lr: 0.05,
        weight_decay: 5e-4,
        ..Default::default()
    };
    train::train(&g, &tr, &c, &TrainOpts::default()).unwrap();
    let ev = train::evaluate(&g, &te, 1000).unwrap();
    assert!(ev.top1 >= 0.988, "LeNet-5 MNIST top-1 {}", ev.top1);
    let _ = Mode::Eval;
}

/// A device-path run (issue 21: the GPU's path, here on the CPU) checkpointed after one
/// epoch and resumed (its optimizer state moved to the host in the checkpoint and back)
/// ends where the uninterrupted run ends.
#[test]
fn device_path_checkpoints_resume_exactly() {
    let tr = data::load("digits", Split::Train, None).unwrap();
    let c = cfg(2);
    let ck = std::env::temp_dir().join(format!("lopper-device-ck-{}.ckpt", std::process::id()));
    let _ = std::fs::remove_file(&ck);
    let dev_opts = |checkpoint: Option<std::path::PathBuf>, stop_after| TrainOpts {
        device_path: true,
        checkpoint,
        stop_after,
        ..Default::default()
    };
    let straight = zoo::build("resnet8@1x8x8", 5).unwrap();
    train::train(&straight, &tr, &c, &dev_opts(None, None)).unwrap();
    let first = zoo::build("resnet8@1x8x8", 5).unwrap();
    train::train(&first, &tr, &c, &dev_opts(Some(ck.clone()), Some(1))).unwrap();
    let resumed = zoo::build("resnet8@1x8x8", 42).unwrap();
    let r = train::train(&resumed, &tr, &c, &dev_opts(Some(ck.clone()), None)).unwrap();
    assert_eq!(r.history.len(), 2);
    assert_eq!(params_of(&straight), params_of(&resumed));
    let _ = std::fs::remove_file(&ck);
}
