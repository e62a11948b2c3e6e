//! The binary end to end: main job, inspect, and bad input giving a clear error with a
//! non-zero exit code (never a panic).

use std::path::PathBuf;

mod common;
use common::{lopper_cli as lopper, macs_kept};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lopper-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn demo_trains_prunes_sparsifies_and_reports() {
    let dir = common::fresh_dir("demo", "out");
    let d = dir.to_str().unwrap();
    let (ok, out, err) = lopper(&["demo", "--epochs", "3", "--json", "--out", d]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["dense"]["result"]["top1"].as_f64().unwrap() > 0.5,
        "{out}"
    );
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 11, "six structured and five sparsity methods");
    let methods: Vec<&str> = steps
        .iter()
        .map(|s| s["step"]["method"].as_str().unwrap())
        .collect();
    for m in [
        "l1", "taylor", "fpgm", "ispasp", "dwr", "stamp", "pot", "unipts",
    ] {
        assert!(methods.contains(&m), "{m} missing from {methods:?}");
    }
    // STAMP's generator was meta-trained by the run itself.
    assert!(dir.join("stamp/stamp-generator.safetensors").exists());
    for s in steps {
        let r = &s["report"];
        assert_eq!(r["schema"], "lopper.report/1", "{s}");
        match r["command"].as_str().unwrap() {
            // Structured: at most half the MACs, physically smaller.
            "prune" => assert!(macs_kept(r) <= 0.5 + 1e-9, "{s}"),
            // Sparse: 90 % zeros.
            _ => assert!(
                (r["result"]["sparsity"].as_f64().unwrap() - 0.9).abs() < 0.01,
                "{s}"
            ),
        }
    }
    assert!(dir.join("report.html").exists());
}

#[test]
fn inspect_prints_the_cost_table() {
    let (ok, out, _) = lopper(&["inspect", "resnet56"]);
    assert!(ok);
    assert!(
        out.contains("125485696") && out.contains("layer3.8.conv2"),
        "{out}"
    );
}

#[test]
fn unknown_model_and_missing_file() {
    let (ok, _, err) = lopper(&["inspect", "resnet57"]);
    assert!(!ok && err.contains("6n+2"), "{err}");
    let (ok, _, err) = lopper(&["inspect", "alexnet"]);
    assert!(!ok && err.contains("unknown model 'alexnet'"), "{err}");
    let (ok, _, err) = lopper(&["eval", "missing/model.safetensors"]);
    assert!(!ok && err.contains("missing/model.safetensors"), "{err}");
}

#[test]
fn truncated_and_wrong_magic_idx_name_the_file() {
    let d = tmpdir("idx");
    let m = d.join("mnist");
    std::fs::create_dir_all(&m).unwrap();
    // Truncated images: header says 10 images of 28x28, data has 100 bytes.
    let mut img = vec![0u8, 0, 8, 3];
    for x in [10u32, 28, 28] {
        img.extend(x.to_be_bytes());
    }
    img.extend(vec![0u8; 100]);
    std::fs::write(m.join("t10k-images-idx3-ubyte.gz"), gz(&img)).unwrap();
    let mut lab = vec![0u8, 0, 8, 1];
    lab.extend(10u32.to_be_bytes());
    lab.extend(vec![0u8; 10]);
    std::fs::write(m.join("t10k-labels-idx1-ubyte.gz"), gz(&lab)).unwrap();
    let dd = d.to_str().unwrap();
    let (ok, _, err) = lopper(&["eval", "lenet5", "--data", "mnist", "--data-dir", dd]);
    assert!(
        !ok && err.contains("t10k-images-idx3-ubyte.gz") && err.contains("truncated"),
        "{err}"
    );
    // Wrong magic.
    img[2] = 0x0d;
    std::fs::write(m.join("t10k-images-idx3-ubyte.gz"), gz(&img)).unwrap();
    let (ok, _, err) = lopper(&["eval", "lenet5", "--data", "mnist", "--data-dir", dd]);
    assert!(
        !ok && err.contains("t10k-images-idx3-ubyte.gz") && err.contains("0x0d"),
        "{err}"
    );
    // Missing file.
    let (ok, _, err) = lopper(&[
        "eval",
        "lenet5",
        "--data",
        "fashion-mnist",
        "--data-dir",
        dd,
    ]);
    assert!(
        !ok && err.contains("fashion-mnist") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn weights_that_do_not_fit_name_the_tensor() {
    let d = tmpdir("w");
    let p = d.join("w.safetensors");
    let g = lopper::zoo::build("mlp:64-20-10", 0).unwrap();
    lopper::graph::io::save(&g, &p).unwrap();
    let (ok, _, err) = lopper(&["eval", "mlp:64-32-10", "--weights", p.to_str().unwrap()]);
    assert!(
        !ok && err.contains("fc1.") && err.contains("w.safetensors"),
        "{err}"
    );
}

#[test]
fn prune_writes_model_and_report() {
    let d = tmpdir("prune");
    let out = d.join("p.safetensors");
    let (ok, stdout, err) = lopper(&[
        "prune",
        "resnet8",
        "--data",
        "digits",
        "--method",
        "l1",
        "--keep-macs",
        "0.5",
        "--finetune-epochs",
        "1",
        "--lr",
        "0.01",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(macs_kept(&v) <= 0.5);
    assert!(v["result"]["top1"].as_f64().is_some());
    assert!(out.exists() && d.join("p.report.json").exists());
    let (ok, insp, _) = lopper(&["inspect", out.to_str().unwrap()]);
    assert!(ok && insp.contains("total:"));
    let (ok, _, err) = lopper(&[
        "prune",
        "resnet8",
        "--data",
        "digits",
        "--method",
        "magic",
        "--remove-channels",
        "0.5",
    ]);
    assert!(
        !ok && err.contains("invalid value 'magic'") && err.contains("possible values"),
        "{err}"
    );
}

#[test]
fn sensitivity_writes_a_chart() {
    let d = tmpdir("sens");
    let svg = d.join("s.svg");
    let (ok, out, err) = lopper(&[
        "sensitivity",
        "resnet8",
        "--data",
        "digits",
        "--remove-channels",
        "0.5",
        "--eval-limit",
        "200",
        "-o",
        svg.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["rows"].as_array().unwrap().len() >= 3);
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.contains("polyline"));
    let (ok, _, err) = lopper(&[
        "sensitivity",
        "resnet8",
        "--data",
        "digits",
        "--remove-channels",
        "1.2",
    ]);
    assert!(!ok && err.contains("[0, 1)"), "{err}");
}

#[test]
fn iterative_pruning_meets_the_overall_budget() {
    let (ok, out, err) = lopper(&[
        "prune",
        "resnet8",
        "--data",
        "digits",
        "--method",
        "l2",
        "--scope",
        "global",
        "--keep-macs",
        "0.4",
        "--steps",
        "3",
        "--step-epochs",
        "1",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = macs_kept(&v);
    assert!(r <= 0.4 && r > 0.3, "{r}");
}

#[test]
fn ispasp_prunes_block_by_block_to_a_macs_target() {
    let (ok, out, err) = lopper(&[
        "prune",
        "resnet8",
        "--data",
        "digits",
        "--method",
        "ispasp",
        "--keep-macs",
        "0.6",
        "--calib",
        "256",
        "--block-ft-samples",
        "300",
        "--finetune-epochs",
        "1",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = macs_kept(&v);
    assert!(r <= 0.6 && r > 0.45, "{r}");
    let mods = v["details"]["modules"].as_array().unwrap();
    assert_eq!(mods.len(), 3, "{out}");
    for m in mods {
        assert!(m["seconds"].as_f64().unwrap() > 0.0);
        assert!(m["kept"].as_u64().unwrap() < m["width"].as_u64().unwrap());
    }
    let (ok, _, err) = lopper(&[
        "prune",
        "resnet8",
        "--data",
        "digits",
        "--method",
        "ispasp",
        "--keep-macs",
        "0.02",
    ]);
    assert!(
        !ok && err.contains("unreachable") && err.contains("% of the dense MACs"),
        "{err}"
    );
    let (ok, _, err) = lopper(&[
        "prune",
        "resnet8",
        "--data",
        "digits",
        "--method",
        "ispasp",
        "--remove-channels",
        "0.5",
        "--override",
        "conv1=0.5",
    ]);
    assert!(
        !ok && err.contains("'conv1' is not in a two-layer module"),
        "{err}"
    );
}

#[test]
fn dwr_collects_fits_snaps_and_reuses_its_cache() {
    let d = tmpdir("dwr");
    let cache = d.join("points.json");
    let args = [
        "prune",
        "resnet20",
        "--data",
        "digits",
        "--method",
        "dwr",
        "--keep-macs",
        "0.5",
        "--dwr-res-step",
        "2",
        "--step-epochs",
        "1",
        "--train-limit",
        "400",
        "--eval-limit",
        "200",
        "--dwr-cache",
        cache.to_str().unwrap(),
        "--json",
    ];
    let (ok, out, err) = lopper(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(macs_kept(&v) <= 0.5);
    let det = &v["details"];
    let pts = det["points"].as_array().unwrap();
    // dense + depth (blocks down to d ≥ 0.3) + width (0.9 … 0.3) + resolution (6, 4 px).
    assert!(pts.len() >= 1 + 3 + 3 + 2, "{}", pts.len());
    assert_eq!(pts.iter().filter(|p| p["axis"] == "dense").count(), 1);
    // Snapped configuration within budget, exact MACs reported.
    assert!(det["macs"].as_u64().unwrap() as f64 <= 0.5 * v["dense"]["macs"].as_f64().unwrap());
    assert!(cache.exists());
    // A rerun reuses every collected point: identical points, no collection training.
    let (ok, out2, err) = lopper(&args);
    assert!(ok, "{err}");
    let v2: serde_json::Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(v2["details"]["points"], det["points"]);
    assert_eq!(v2["seconds"]["finetune"].as_f64().unwrap(), 0.0);
    // An impossible budget names the limit.
    let (ok, _, err) = lopper(&[
        "prune",
        "resnet20",
        "--data",
        "digits",
        "--method",
        "dwr",
        "--keep-macs",
        "0.001",
        "--dwr-res-step",
        "2",
        "--step-epochs",
        "0",
        "--dwr-cache",
        cache.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("below what any configuration"), "{err}");
    // A model without residual blocks cannot be depth-pruned.
    let (ok, _, err) = lopper(&[
        "prune",
        "mlp:64-32-10",
        "--data",
        "digits",
        "--method",
        "dwr",
        "--keep-macs",
        "0.5",
    ]);
    assert!(!ok && err.contains("no removable residual block"), "{err}");
}

#[test]
fn sparsify_runs_each_method_and_rejects_bad_input() {
    let d = tmpdir("sparsify");
    // A trained dense start: ResNet-8 on the embedded digits.
    let dense = d.join("dense.safetensors");
    let (ok, _, err) = lopper(&[
        "train",
        "resnet8",
        "--data",
        "digits",
        "--epochs",
        "3",
        "--lr",
        "0.05",
        "--batch-size",
        "64",
        "-o",
        dense.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let m = dense.to_str().unwrap();
    for (method, extra) in [
        ("magnitude", vec![]),
        ("global", vec![]),
        ("wanda", vec![]),
        ("pot", vec!["--pot-iters", "1"]),
        (
            "unipts",
            vec![
                "--epochs",
                "1",
                "--ga-pop",
                "3",
                "--ga-gens",
                "1",
                "--ga-parents",
                "2",
                "--ga-children",
                "1",
            ],
        ),
    ] {
        let out = d.join(format!("{method}.safetensors"));
        let mut args = vec![
            "sparsify",
            m,
            "--data",
            "digits",
            "--method",
            method,
            "--sparsity",
            "0.7",
            "--calib",
            "256",
            "--json",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let (ok, stdout, err) = lopper(&args);
        assert!(ok, "{method}: {err}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let s = v["result"]["sparsity"].as_f64().unwrap();
        assert!(s > 0.69 && s < 0.8, "{method}: sparsity {s}");
        assert!(
            v["result"]["nonzero_macs"].as_u64().unwrap() < v["dense"]["macs"].as_u64().unwrap()
        );
        assert!(out.exists() && d.join(format!("{method}.report.json")).exists());
        // The saved model evaluates to the reported accuracy.
        let (ok, ev, err) = lopper(&["eval", out.to_str().unwrap(), "--data", "digits", "--json"]);
        assert!(ok, "{err}");
        let e: serde_json::Value = serde_json::from_str(&ev).unwrap();
        assert!(
            (e["result"]["top1"].as_f64().unwrap() - v["result"]["top1"].as_f64().unwrap()).abs()
                < 1e-9,
            "{method}: {ev}"
        );
    }
    // 2:4 with magnitude.
    let (ok, stdout, err) = lopper(&[
        "sparsify",
        m,
        "--data",
        "digits",
        "--method",
        "magnitude",
        "--pattern",
        "2:4",
        "--calib",
        "128",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!((v["result"]["sparsity"].as_f64().unwrap() - 0.5).abs() < 0.02);
    // Bad input.
    for (args, want) in [
        (vec!["--sparsity", "1.0"], "must be in [0, 1)"),
        (vec!["--sparsity=-0.2"], "must be in [0, 1)"),
        (vec!["--pattern", "4:4"], "need 0 < N < M"),
        (vec!["--pattern", "5:4"], "need 0 < N < M"),
        (
            vec!["--sparsity", "0.5", "--calib", "100000"],
            "--calib 100000: the training split of digits has only",
        ),
        (
            vec!["--sparsity", "0.5", "--method", "magic"],
            "invalid value 'magic' for '--method",
        ),
        (
            vec!["--pattern", "2:4", "--method", "pot"],
            "no N:M variant",
        ),
        (vec![], "give --sparsity"),
    ] {
        let mut a = vec!["sparsify", m, "--data", "digits"];
        a.extend(args.iter().copied());
        if !args.contains(&"--calib") {
            a.extend(["--calib", "64"]);
        }
        let (ok, _, err) = lopper(&a);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn stamp_meta_trains_and_prunes_unseen_classes() {
    let d = tmpdir("stamp");
    let refm = d.join("ref.safetensors");
    let (ok, _, err) = lopper(&[
        "train",
        "resnet8",
        "--data",
        "digits",
        "--classes",
        "0,1,2,3,4,5",
        "--epochs",
        "3",
        "--lr",
        "0.05",
        "--batch-size",
        "64",
        "-o",
        refm.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let gen = d.join("gen.safetensors");
    let (ok, out, err) = lopper(&[
        "stamp",
        "meta-train",
        refm.to_str().unwrap(),
        "--data",
        "digits",
        "--classes",
        "0,1,2,3,4,5",
        "--iterations",
        "3",
        "--tasks",
        "2",
        "--n-way",
        "3",
        "--n-per-class",
        "5",
        "--inner-steps",
        "2",
        "-o",
        gen.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["history"].as_array().unwrap().len(), 3);
    // `lopper prune REF --method stamp` on the unseen classes at ≤ 60 % MACs, plus `extra`.
    let stamp_prune = |extra: &[&str]| {
        let mut args = vec![
            "prune",
            refm.to_str().unwrap(),
            "--data",
            "digits",
            "--classes",
            "6,7,8,9",
            "--method",
            "stamp",
            "--generator",
            gen.to_str().unwrap(),
            "--set-size",
            "40",
            "--keep-macs",
            "0.6",
        ];
        args.extend_from_slice(extra);
        lopper(&args)
    };
    let (ok, out, err) = stamp_prune(&["--finetune-epochs", "2", "--lr", "0.05", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(macs_kept(&v) <= 0.6, "{out}");
    assert!(v["result"]["top1"].as_f64().unwrap() > 0.5, "{out}");
    // Baseline (c): the same widths, random channels.
    let (ok, out2, err) = stamp_prune(&["--stamp-random", "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(
        r["details"]["kept_per_group"],
        v["details"]["kept_per_group"]
    );
    assert_eq!(macs_kept(&r), macs_kept(&v));
    assert_ne!(r["top1_before_finetune"], serde_json::Value::Null);
    // Target-time adaptation before pruning: same budget, a trained head to start from.
    let (ok, out3, err) = stamp_prune(&[
        "--stamp-adapt",
        "10",
        "--lr",
        "0.05",
        "--batch-size",
        "32",
        "--json",
    ]);
    assert!(ok, "{err}");
    let r3: serde_json::Value = serde_json::from_str(&out3).unwrap();
    assert!(macs_kept(&r3) <= 0.6);
    assert!(
        r3["top1_before_finetune"].as_f64().unwrap() > v["top1_before_finetune"].as_f64().unwrap(),
        "{out3}"
    );
    // A generator trained for another architecture, a set larger than the data.
    let (ok, _, err) = lopper(&[
        "prune",
        "resnet20@1x8x8",
        "--data",
        "digits",
        "--method",
        "stamp",
        "--generator",
        gen.to_str().unwrap(),
        "--keep-macs",
        "0.6",
    ]);
    assert!(!ok && err.contains("different architecture"), "{err}");
    let (ok, _, err) = lopper(&[
        "prune",
        refm.to_str().unwrap(),
        "--data",
        "digits",
        "--classes",
        "6,7,8,9",
        "--method",
        "stamp",
        "--generator",
        gen.to_str().unwrap(),
        "--set-size",
        "100000",
        "--keep-macs",
        "0.6",
    ]);
    assert!(!ok && err.contains("sample set of 100000"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// One vocabulary: the same flag for the same concept in every command, names that say
/// whether a fraction is kept or removed, the old names still accepted, and the same
/// `--calib` rule everywhere.
#[test]
fn flags_share_one_vocabulary_and_old_names_still_work() {
    let help = |cmd: &str| lopper(&[cmd, "--help"]).1;
    for (cmd, flags) in [
        (
            "train",
            &[
                "--train-limit",
                "--epochs",
                "--batch-size",
                "--lr",
                "--seed",
            ][..],
        ),
        (
            "prune",
            &[
                "--keep-macs",
                "--keep-params",
                "--remove-channels",
                "--train-limit",
                "--eval-limit",
                "--calib",
                "--finetune-epochs",
                "--eval-every-epoch",
                "--batch-size",
            ][..],
        ),
        (
            "sparsify",
            &[
                "--sparsity",
                "--eval-limit",
                "--calib",
                "--finetune-epochs",
                "--eval-every-epoch",
                "--batch-size",
            ][..],
        ),
        (
            "sensitivity",
            &["--remove-channels", "--eval-limit", "--calib"][..],
        ),
        ("convert", &["--json"][..]),
        ("forward", &["--json"][..]),
    ] {
        let h = help(cmd);
        for f in flags {
            assert!(h.contains(f), "{cmd} --help lacks {f}:\n{h}");
        }
    }
    // Every method and model name is listed where a user picks one.
    let h = help("prune");
    for m in lopper::zoo::MODELS.iter().chain(lopper::zoo::SHIPPED) {
        assert!(h.contains(m), "prune --help lacks model name {m}");
    }
    for m in ["l1", "taylor", "fpgm", "ispasp", "dwr", "stamp"] {
        assert!(h.contains(m), "prune --help lacks method {m}");
    }
    let (ok, _, err) = lopper(&["eval", "no-such-net"]);
    assert!(
        !ok && err.contains("digit_recognizer_cnn") && err.contains("resnet8"),
        "{err}"
    );
    // Old names (aliases for one release).
    let (ok, out, err) = lopper(&[
        "prune",
        "resnet8",
        "--data",
        "none",
        "--method",
        "l1",
        "--target-macs",
        "0.5",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        macs_kept(&v) <= 0.5 && v["budget"] == "keep <= 0.5 of the MACs",
        "{out}"
    );
    let (ok, out, err) = lopper(&[
        "prune", "resnet8", "--data", "none", "--method", "l1", "--ratio", "0.25", "--json",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("remove 0.25 of the channels"), "{out}");
    // --calib larger than the training split is the same error in prune and sparsify.
    for args in [
        &[
            "prune",
            "resnet8",
            "--method",
            "taylor",
            "--keep-macs",
            "0.5",
            "--calib",
            "5000",
        ][..],
        &[
            "sparsify",
            "resnet8",
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--calib",
            "5000",
        ][..],
    ] {
        let (ok, _, err) = lopper(args);
        assert!(
            !ok && err.contains("--calib 5000: the training split of digits has only"),
            "{args:?}: {err}"
        );
    }
}

/// `prune` and `sparsify` print one schema: the same keys (top level, `dense`, `result`,
/// `seconds`, `layers[]`), each documented in docs/report-schema.md.
#[test]
fn prune_and_sparsify_reports_share_one_documented_schema() {
    let (ok, p, err) = lopper(&[
        "prune",
        "resnet8",
        "--data",
        "none",
        "--method",
        "l1",
        "--keep-macs",
        "0.5",
        "--json",
    ]);
    assert!(ok, "{err}");
    let (ok, s, err) = lopper(&[
        "sparsify",
        "resnet8",
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--calib",
        "64",
        "--eval-limit",
        "100",
        "--json",
    ]);
    assert!(ok, "{err}");
    let (p, s): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&p).unwrap(),
        serde_json::from_str(&s).unwrap(),
    );
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/report-schema.md"),
    )
    .unwrap();
    let keys =
        |v: &serde_json::Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    for path in [
        &[][..],
        &["dense"][..],
        &["result"][..],
        &["seconds"][..],
        &["layers", "0"][..],
    ] {
        let at = |v: &serde_json::Value| {
            path.iter()
                .fold(v.clone(), |v, k| match k.parse::<usize>() {
                    Ok(i) => v[i].clone(),
                    Err(_) => v[*k].clone(),
                })
        };
        let (kp, ks) = (keys(&at(&p)), keys(&at(&s)));
        assert_eq!(
            kp, ks,
            "keys under {path:?} differ between prune and sparsify"
        );
        for k in kp {
            assert!(
                doc.contains(&format!("`{k}`")) || doc.contains(&format!("`seconds.{k}`")),
                "key {k} is not documented"
            );
        }
    }
    assert_eq!(
        (p["command"].as_str(), s["command"].as_str()),
        (Some("prune"), Some("sparsify"))
    );
    assert!(p["pattern"].is_null() && s["scope"].is_null() && p["top1_before_finetune"].is_null());
    assert!((s["result"]["sparsity"].as_f64().unwrap() - 0.5).abs() < 0.02);
    assert!(s["result"]["nonzero_macs"].as_u64() < s["result"]["macs"].as_u64());
}

/// A ViT through the CLI: AdamW fine-tuning (`--optimizer adamw`) after pruning heads, FFN
/// units and, on request, the embedding dimension; the fine-tuning recovers accuracy and
/// the embedding (LayerNorm widths) shrinks.
#[test]
fn prune_a_vit_with_adamw_and_its_embedding() {
    let d = tmpdir("vit");
    let dense = d.join("vit.safetensors");
    let (ok, _, err) = lopper(&[
        "train",
        "vit:32-2-4-2@1x8x8",
        "--data",
        "digits",
        "--epochs",
        "12",
        "--batch-size",
        "32",
        "--optimizer",
        "adamw",
        "--lr",
        "2e-3",
        "--weight-decay",
        "0.05",
        "--warmup-epochs",
        "1",
        "-o",
        dense.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let out = d.join("p.safetensors");
    let (ok, stdout, err) = lopper(&[
        "prune",
        dense.to_str().unwrap(),
        "--data",
        "digits",
        "--method",
        "taylor",
        "--keep-macs",
        "0.5",
        "--prune-embedding",
        "--finetune-epochs",
        "3",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--weight-decay",
        "0.05",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(macs_kept(&v) <= 0.5);
    let (before, after) = (
        v["top1_before_finetune"].as_f64().unwrap(),
        v["result"]["top1"].as_f64().unwrap(),
    );
    assert!(after > before && after > 0.6, "{before} -> {after}");
    let g = lopper::graph::io::load(&out).unwrap();
    let norm = g.params()["norm.weight"].dims()[0];
    assert!(norm < 32, "embedding kept at {norm}");
}
