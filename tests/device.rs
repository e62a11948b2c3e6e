//! The device-generic path (issue 21), tested where it can be without a GPU: the trainer's
//! GPU path (tensor-op optimizer, loss and accuracy kept on the device, candle's ops instead
//! of lopper's CPU kernels) run on the CPU against the host path; how often it reads back
//! to the host; a resumed run from it; and the `--device` errors.

mod common;

use common::lopper_cli;
use lopper::data::{self, Split};
use lopper::train::{self, OptimizerKind, TrainConfig, TrainOpts, SYNC_EVERY};
use lopper::zoo;

fn params_of(g: &lopper::graph::Graph) -> Vec<f32> {
    g.params()
        .values()
        .flat_map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn cfg(optimizer: OptimizerKind) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 32,
        lr: 0.05,
        crop_pad: 1,
        optimizer,
        ..Default::default()
    }
}

/// One test (the host-read counter is process-wide): for SGD with Nesterov momentum and
/// for AdamW, a BN network trained on the device path ends where the host path ends, and
/// reads back only at its sync points.
#[test]
fn device_path_trains_like_the_host_path_and_reads_back_only_at_sync_points() {
    let tr = data::load("digits", Split::Train, None).unwrap();
    let te = data::load("digits", Split::Test, None).unwrap();
    let steps = tr.len().div_ceil(32);
    for opt in [
        OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: true,
        },
        OptimizerKind::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    ] {
        let mut c = cfg(opt.clone());
        if matches!(opt, OptimizerKind::Adamw { .. }) {
            c.lr = 2e-3;
        }
        // Both paths on candle's ops (what a GPU runs), so what differs is the path itself.
        lopper::kernels::use_reference_ops(true);
        let host = zoo::build("resnet8@1x8x8", 3).unwrap();
        let before = lopper::device::host_reads();
        let rh = train::train(&host, &tr, &c, &TrainOpts::default()).unwrap();
        let host_reads = lopper::device::host_reads() - before;
        // The host path reads the loss and the predictions every step.
        assert_eq!(host_reads, 2 * steps * 2, "{opt:?}");

        let dev = zoo::build("resnet8@1x8x8", 3).unwrap();
        let before = lopper::device::host_reads();
        let opts = TrainOpts {
            device_path: true,
            ..Default::default()
        };
        let rd = train::train(&dev, &tr, &c, &opts).unwrap();
        let dev_reads = lopper::device::host_reads() - before;
        lopper::kernels::use_reference_ops(false);
        // One read per SYNC_EVERY steps and one at each epoch's end, nothing per step.
        assert_eq!(dev_reads, 2 * steps.div_ceil(SYNC_EVERY), "{opt:?}");

        // Same trajectory: the per-epoch loss and accuracy agree, the weights stay close
        // (the tensor-op updates round differently from the host loops).
        for (a, b) in rh.history.iter().zip(&rd.history) {
            assert!(
                (a.train_loss - b.train_loss).abs() < 0.02 * a.train_loss.max(0.1),
                "{opt:?} epoch {}: loss {} vs {}",
                a.epoch,
                a.train_loss,
                b.train_loss
            );
            assert!(
                (a.train_top1 - b.train_top1).abs() < 0.03,
                "{opt:?} epoch {}: top-1 {} vs {}",
                a.epoch,
                a.train_top1,
                b.train_top1
            );
        }
        let (ph, pd) = (params_of(&host), params_of(&dev));
        let diff = ph
            .iter()
            .zip(&pd)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = ph.iter().map(|a| a.abs()).fold(0f32, f32::max);
        eprintln!("{opt:?}: max weight difference {diff} (scale {scale})");
        assert!(
            diff < 0.05 * scale,
            "{opt:?}: weights differ by {diff} (scale {scale})"
        );
        let (eh, ed) = (
            train::evaluate(&host, &te, 200).unwrap(),
            train::evaluate(&dev, &te, 200).unwrap(),
        );
        assert!(eh.top1 > 0.6, "{opt:?}: host path learnt only {}", eh.top1);
        assert!(
            (eh.top1 - ed.top1).abs() < 0.04,
            "{opt:?}: test top-1 {} vs {}",
            eh.top1,
            ed.top1
        );
    }
}

#[test]
fn device_flag_errors_name_the_fix() {
    let (ok, _, err) = lopper_cli(&["eval", "mlp:64-10", "--device", "tpu"]);
    assert!(!ok);
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
    let (ok, _, err) = lopper_cli(&["eval", "mlp:64-10", "--device", "cuda:x"]);
    assert!(!ok);
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
    // This test binary is the CPU build: CUDA is a rebuild away, said so.
    for cmd in [
        &["eval", "mlp:64-10", "--device", "cuda"][..],
        &["train", "mlp:64-10", "--epochs", "1", "--device", "cuda:1"],
        &[
            "prune",
            "mlp:64-10",
            "--keep-macs",
            "0.5",
            "--device",
            "cuda",
        ],
        &[
            "sparsify",
            "mlp:64-10",
            "--sparsity",
            "0.5",
            "--device",
            "cuda",
        ],
        &["bench", "--model", "mlp:64-10", "--device", "cuda"],
        &[
            "forward",
            "mlp:64-10",
            "--input",
            "x.npy",
            "--output",
            "y.npy",
            "--device",
            "cuda",
        ],
    ] {
        let (ok, _, err) = lopper_cli(cmd);
        assert!(!ok, "{cmd:?}");
        if cfg!(feature = "cuda") {
            assert!(err.contains("cannot be opened"), "{cmd:?}: {err}");
        } else {
            assert!(err.contains("built without CUDA support"), "{cmd:?}: {err}");
            assert!(err.contains("--features cuda"), "{cmd:?}: {err}");
        }
        assert!(!err.contains("panicked"), "{cmd:?}: {err}");
    }
    // The CPU spelled out is the default.
    let (ok, out, err) = lopper_cli(&["eval", "mlp:64-10", "--device", "cpu", "--json"]);
    assert!(ok, "{err}");
    assert!(out.contains("top1"), "{out}");
}
