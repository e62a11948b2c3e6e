//! Issue 15: every wrong result, crash and fault found by probing the CLI, each with the
//! bad input and the exact expectation. (Aliasing of rewrites: tests/aliasing.rs.)

use lopper::graph::{io, Graph};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::lopper_cli as lopper;

/// Fails with a message containing every needle.
fn refused(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = lopper(args);
    assert!(!ok, "accepted: lopper {}", args.join(" "));
    for n in needles {
        assert!(
            err.contains(n),
            "lopper {}: '{n}' not in: {err}",
            args.join(" ")
        );
    }
}

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("trust", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn data_dir() -> PathBuf {
    lopper::data::data_dir()
}

/// A saved model whose classifier weight (or `which`) holds NaN, written past
/// `io::save`'s own refusal.
fn nan_model(dir: &Path) -> PathBuf {
    nan_model_at(dir, "fc.weight")
}

fn nan_model_at(dir: &Path, which: &str) -> PathBuf {
    let g = lopper::zoo::build("resnet8@1x8x8#10", 0).unwrap();
    let p = dir.join(format!("nan-{which}.safetensors"));
    io::save(&g, &p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let (mut t, meta) = io::tensors_from_bytes(&bytes, "x").unwrap();
    let k = t.keys().find(|k| k.ends_with(which)).unwrap().clone();
    let w = &t[&k];
    let nan = candle_core::Tensor::full(f32::NAN, w.dims(), &candle_core::Device::Cpu).unwrap();
    t.insert(k, nan);
    std::fs::write(&p, io::tensors_to_bytes(&t, meta).unwrap()).unwrap();
    p
}

// ---- wrong results ---------------------------------------------------------------------

#[test]
fn nan_outputs_score_zero_and_are_reported() {
    let d = tmpdir("nan");
    let m = nan_model(&d);
    let (ok, out, err) = lopper(&["eval", s(&m), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["result"]["top1"].as_f64(), Some(0.0), "{out}");
    assert_eq!(v["result"]["non_finite"].as_u64(), Some(360), "{out}");
    assert!(err.contains("not finite"), "{err}");
    // NaN inside the net can vanish on the way (ReLU maps it to 0 in lopper's kernels):
    // the weights are checked too and the warning names the tensor.
    let inner = nan_model_at(&d, "conv1.weight");
    let (ok, _, err) = lopper(&["eval", s(&inner)]);
    assert!(
        ok && err.contains("conv1.weight") && err.contains("non-finite"),
        "{err}"
    );
    // prune cannot rank NaN importances: an error naming the layer, not a 100 % report.
    refused(
        &["prune", s(&inner), "--remove-channels", "0.3"],
        &["NaN", "conv1"],
    );
    // sparsify reports the dense model's 0 % with the warning.
    let (ok, out, err) = lopper(&[
        "sparsify",
        s(&m),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--calib",
        "64",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dense"]["top1"].as_f64(), Some(0.0), "{out}");
    assert!(
        v["warnings"].as_array().is_some_and(|w| !w.is_empty()),
        "{out}"
    );
    // Converting it is refused: a model with NaN weights is never written silently.
    let o = d.join("p.safetensors");
    refused(
        &["convert", s(&m), "-o", s(&o)],
        &["refusing to write", "non-finite"],
    );
    assert!(!o.exists(), "a model with NaN weights was written");
}

#[test]
fn a_diverging_sparse_training_stops_with_an_error_and_writes_nothing() {
    let d = tmpdir("diverge");
    let g = d.join("dense.safetensors");
    let (ok, _, err) = lopper(&[
        "train",
        "resnet8",
        "--epochs",
        "1",
        "--lr",
        "0.05",
        "-o",
        s(&g),
    ]);
    assert!(ok, "{err}");
    let o = d.join("s.safetensors");
    let (ok, _, err) = lopper(&[
        "sparsify",
        s(&g),
        "--method",
        "unipts",
        "--sparsity",
        "0.5",
        "--calib",
        "256",
        "--epochs",
        "1",
        "--search",
        "none",
        "--lr",
        "1e9",
        "-o",
        s(&o),
    ]);
    assert!(!ok, "sparsify --lr 1e9 succeeded");
    assert!(
        err.contains("non-finite") || err.contains("loss became"),
        "{err}"
    );
    assert!(!o.exists());
    // Dense training too.
    let (ok, _, err) = lopper(&["train", "resnet8", "--epochs", "1", "--lr", "1e9"]);
    assert!(
        !ok && (err.contains("non-finite") || err.contains("loss became")),
        "{err}"
    );
}

#[test]
fn io_refuses_to_save_non_finite_weights() {
    let g = lopper::zoo::build("mlp:8-4-2", 0).unwrap();
    let k = "fc1.weight";
    let v = &g.params()[k];
    g.set_param(
        k,
        &candle_core::Tensor::full(f32::INFINITY, v.dims(), &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap();
    let d = tmpdir("save-nan");
    let e = format!("{:#}", io::save(&g, &d.join("m.safetensors")).unwrap_err());
    assert!(e.contains("fc1.weight") && e.contains("non-finite"), "{e}");
    let e = format!(
        "{:#}",
        lopper::onnx::save(&g, &d.join("m.onnx")).unwrap_err()
    );
    assert!(e.contains("fc1.weight"), "{e}");
    assert!(
        std::fs::read_dir(&d).unwrap().next().is_none(),
        "a file was left"
    );
}

/// Copies `n` JPEGs of two CIFAR-10 classes out of the shared test archive.
fn jpegs(n: usize) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let f = std::fs::File::open(data_dir().join("cifar10-jpeg/cifar10-jpeg-test.tar.gz")).unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().to_string();
        let class = p.split('/').nth(1).unwrap_or("").to_string();
        let want = ["airplane", "automobile"].contains(&class.as_str());
        if want && p.ends_with(".jpg") && out.iter().filter(|(c, _)| *c == class).count() < n {
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            out.push((class, b));
        }
        if out.len() == 2 * n {
            break;
        }
    }
    out
}

#[test]
fn image_folders_use_train_and_test_folders_as_the_splits() {
    let d = tmpdir("folder");
    let imgs = jpegs(6);
    let split = d.join("split");
    for (i, (c, b)) in imgs.iter().enumerate() {
        // 4 of each class to train, 2 to test.
        let part = if i % 6 < 4 { "train" } else { "test" };
        let dir = split.join(part).join(c);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{i}.jpg")), b).unwrap();
    }
    let tr = lopper::data::load(s(&split), lopper::data::Split::Train, None).unwrap();
    let te = lopper::data::load(s(&split), lopper::data::Split::Test, None).unwrap();
    assert_eq!((tr.len(), te.len()), (8, 4));
    assert_eq!(tr.num_classes, 2);
    for i in 0..te.len() {
        assert!(
            (0..tr.len()).all(|j| tr.pixels(j) != te.pixels(i)),
            "test image {i} is also a training image"
        );
    }
    // Both normalised with the training statistics.
    assert_eq!(
        (tr.mean.clone(), tr.std.clone()),
        (te.mean.clone(), te.std.clone())
    );
    // A tree without split folders: an error, or --holdout.
    let flat = d.join("flat");
    for (i, (c, b)) in imgs.iter().enumerate() {
        let dir = flat.join(c);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{i}.jpg")), b).unwrap();
    }
    refused(
        &["eval", "resnet8", "--data", s(&flat)],
        &["no train/ and test/", "--holdout"],
    );
    let h = lopper::data::Holdout {
        fraction: 0.25,
        seed: 1,
    };
    let tr = lopper::data::load_with(s(&flat), lopper::data::Split::Train, None, Some(h)).unwrap();
    let te = lopper::data::load_with(s(&flat), lopper::data::Split::Test, None, Some(h)).unwrap();
    assert_eq!((tr.len(), te.len()), (9, 3));
    for i in 0..te.len() {
        assert!((0..tr.len()).all(|j| tr.pixels(j) != te.pixels(i)));
    }
    let (ok, _, err) = lopper(&[
        "eval",
        "resnet8",
        "--data",
        s(&flat),
        "--holdout",
        "0.25",
        "--json",
    ]);
    assert!(ok, "{err}");
    refused(
        &["eval", "resnet8", "--data", s(&split), "--holdout", "0.25"],
        &["has train/ and test/ folders"],
    );
    refused(
        &["eval", "resnet8", "--data", "mnist", "--holdout", "0.2"],
        &["own test split"],
    );
    // Random bytes named .tar: a clear error, no garbage.
    let junk = d.join("junk.tar");
    std::fs::write(
        &junk,
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let (ok, _, err) = lopper(&["eval", "resnet8", "--data", s(&junk)]);
    assert!(!ok && err.contains("not a tar archive"), "{err}");
    assert!(err.len() < 300 && err.is_ascii(), "{err}");
}

#[test]
fn resume_refuses_other_data_or_config_naming_the_field() {
    let d = tmpdir("resume");
    let ck = d.join("ck.safetensors");
    let base = [
        "train",
        "mlp:64-16-10",
        "--epochs",
        "1",
        "--lr",
        "0.05",
        "--limit",
        "200",
        "--checkpoint",
        s(&ck),
    ];
    let (ok, _, err) = lopper(&base);
    assert!(ok, "{err}");
    let mut again = base.to_vec();
    again.push("--resume");
    let (ok, _, err) = lopper(&again);
    assert!(ok, "same data and config must resume: {err}");
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = again.clone();
        for pair in extra.chunks(2) {
            if let Some(i) = v.iter().position(|a| *a == pair[0]) {
                v[i + 1] = pair[1];
            } else {
                v.extend(pair);
            }
        }
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |v: Vec<String>| lopper(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let (ok, _, err) = run(with(&["--limit", "150"]));
    assert!(
        !ok && err.contains("other data") && err.contains("'samples'"),
        "{err}"
    );
    let (ok, _, err) = run(with(&["--classes", "1,2,3,4,5,6,7,8,9,0"]));
    assert!(
        !ok && err.contains("other data") && err.contains("'name'"),
        "{err}"
    );
    let (ok, _, err) = run(with(&["--limit", "200", "--seed", "3"]));
    assert!(!ok && err.contains("'seed' was 0, this run has 3"), "{err}");
    let (ok, _, err) = run(with(&["--lr", "0.1"]));
    assert!(!ok && err.contains("'lr' was 0.05"), "{err}");
}

#[test]
fn labels_outside_the_model_name_the_file_and_sample() {
    let d = tmpdir("labels");
    let m = d.join("mnist");
    std::fs::create_dir_all(&m).unwrap();
    let mut img = vec![0u8, 0, 8, 3];
    for x in [5u32, 28, 28] {
        img.extend(x.to_be_bytes());
    }
    img.extend(vec![7u8; 5 * 28 * 28]);
    let mut lab = vec![0u8, 0, 8, 1];
    lab.extend(5u32.to_be_bytes());
    lab.extend([1u8, 2, 3, 200, 4]);
    for pre in ["train", "t10k"] {
        std::fs::write(m.join(format!("{pre}-images-idx3-ubyte.gz")), &img).unwrap();
        std::fs::write(m.join(format!("{pre}-labels-idx1-ubyte.gz")), &lab).unwrap();
    }
    let dd = s(&d);
    for cmd in [
        vec!["eval", "lenet5", "--data", "mnist", "--data-dir", dd],
        vec![
            "train",
            "lenet5",
            "--data",
            "mnist",
            "--data-dir",
            dd,
            "--epochs",
            "1",
        ],
    ] {
        refused(&cmd, &["labels-idx1-ubyte", "sample 3", "label 200"]);
    }
    // The library check against a model's head: labels within the data's classes but
    // beyond the model's outputs.
    let ds = lopper::data::load("digits", lopper::data::Split::Test, None).unwrap();
    let g = lopper::zoo::build("mlp:64-8-4", 0).unwrap();
    let e = format!("{:#}", lopper::train::evaluate(&g, &ds, 100).unwrap_err());
    assert!(
        e.contains("embedded digits") && e.contains("only 4 classes"),
        "{e}"
    );
}

#[test]
fn eval_with_classes_keeps_the_original_labels_of_a_full_head() {
    let (ok, out, err) = lopper(&[
        "eval",
        "digit_recognizer_cnn",
        "--data",
        "mnist",
        "--classes",
        "3,5",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let top1 = v["result"]["top1"].as_f64().unwrap();
    assert!(top1 > 0.95, "{out}");
    assert!(v["result"]["n"].as_u64().unwrap() < 2000, "{out}");
    // A 2-class model on the same selection keeps the renumbering (no error).
    let (ok, _, err) = lopper(&["eval", "lenet5#2", "--data", "mnist", "--classes", "3,5"]);
    assert!(ok, "{err}");
    // A 4-class model cannot score class 5: refused with an explanation.
    refused(
        &["eval", "lenet5#4", "--data", "mnist", "--classes", "3,5,1"],
        &["--classes selects 3 classes", "scores 4 classes"],
    );
}

// ---- crashes ---------------------------------------------------------------------------

#[test]
fn no_crash_on_bench_steps_zero_or_huge_models() {
    refused(&["bench", "--steps", "0"], &["must be >= 1"]);
    refused(
        &["inspect", "mlp:784-99999999-10"],
        &["GB", "memory available", "fc1"],
    );
    refused(&["inspect", "resnet20#0"], &["at least 1 class"]);
}

#[test]
fn nan_scores_are_an_error_not_a_panic() {
    use lopper::prune::{dependency_groups, plan, Budget, Criterion, PlanConfig, Scope};
    let g = lopper::zoo::build("mlp:8-6-2", 0).unwrap();
    let v = &g.params()["fc1.weight"];
    let mut w: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    w[0] = f32::NAN;
    g.set_param(
        "fc1.weight",
        &candle_core::Tensor::from_vec(w, v.dims(), &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap();
    let groups = dependency_groups(&g).unwrap();
    for scope in [Scope::Local, Scope::Global] {
        let cfg = PlanConfig {
            criterion: Criterion::L1,
            scope,
            budget: Budget::Ratio(0.5),
            round_to: 1,
            lamp: scope == Scope::Global,
            overrides: vec![],
            seed: 0,
        };
        let e = format!("{:#}", plan(&g, &groups, &cfg, None).unwrap_err());
        assert!(e.contains("NaN") && e.contains("fc1"), "{e}");
    }
}

#[test]
fn closed_pipes_end_quietly() {
    // stdout closed by the reader (like `| head -0`).
    let mut c = Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(["inspect", "resnet110"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take());
    let st = c.wait().unwrap();
    assert_ne!(st.code(), Some(101), "panicked on a closed stdout");
    // stderr closed while an error is written.
    let mut c = Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(["inspect", "alexnet"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stderr.take());
    let st = c.wait().unwrap();
    assert_ne!(st.code(), Some(101), "panicked on a closed stderr");
    assert!(!st.success());
}

// ---- faults and outputs ----------------------------------------------------------------

#[test]
fn unwritable_outputs_are_refused_before_any_work() {
    let d = tmpdir("unwritable");
    let file = d.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = file.join("m.safetensors");
    let t = Instant::now();
    refused(
        &["train", "resnet8", "--epochs", "30", "-o", s(&o)],
        &["m.safetensors", "cannot create directory"],
    );
    refused(
        &[
            "prune",
            "resnet8",
            "--remove-channels",
            "0.5",
            "--finetune-epochs",
            "30",
            "-o",
            s(&o),
        ],
        &["cannot create directory"],
    );
    refused(
        &[
            "sparsify",
            "resnet8",
            "--sparsity",
            "0.5",
            "--calib",
            "64",
            "-o",
            s(&o),
        ],
        &["cannot create directory"],
    );
    refused(
        &["train", "resnet8", "--checkpoint", s(&o)],
        &["checkpoint"],
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "work ran before the check"
    );
    refused(
        &["convert", "resnet8", "-o", s(&d.join("m.pt"))],
        &[".safetensors", ".onnx"],
    );
    refused(&["train", "resnet8", "-o", s(&d)], &["is a directory"]);
}

#[test]
fn model_and_report_are_a_checked_pair() {
    let d = tmpdir("pair");
    let o = d.join("p.safetensors");
    let args = ["prune", "resnet8", "--remove-channels", "0.5", "-o", s(&o)];
    let (ok, _, err) = lopper(&args);
    assert!(ok, "{err}");
    let rp = io::report_path(&o);
    let first = std::fs::read_to_string(&rp).unwrap();
    let emb = io::embedded_report(&o)
        .unwrap()
        .expect("report inside the model");
    assert_eq!(emb["method"], "l1");
    let paired = io::paired_report(&o).unwrap().unwrap();
    assert!(paired["model_file"]["fnv64"].is_string());
    // A second run whose report write was lost (killed between the renames): the stale
    // sidecar no longer matches, and the model's own report is returned.
    let (ok, _, err) = lopper(&["prune", "resnet8", "--remove-channels", "0.25", "-o", s(&o)]);
    assert!(ok, "{err}");
    std::fs::write(&rp, &first).unwrap();
    let got = io::paired_report(&o).unwrap().unwrap();
    assert!(got["budget"].as_str().unwrap().contains("0.25"), "{got}");
}

#[test]
fn stale_temp_files_of_dead_writers_are_removed() {
    let d = tmpdir("stale");
    let target = d.join("m.bin");
    let dead = (30_000..4_000_000)
        .step_by(7919)
        .find(|&p| !lopper::util::process_alive(p))
        .unwrap();
    let stale = d.join(format!(".m.bin.tmp{dead}"));
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    // A live writer's temp file (this process's parent) is kept.
    let live_pid = std::os::unix::process::parent_id();
    let live = d.join(format!(".m.bin.tmp{live_pid}"));
    std::fs::write(&live, b"busy").unwrap();
    lopper::util::atomic_write(&target, b"new").unwrap();
    assert!(!stale.exists(), "stale temp file left");
    assert!(live.exists(), "a live writer's temp file was removed");
    assert_eq!(std::fs::read(&target).unwrap(), b"new");
}

#[test]
fn outputs_are_byte_identical_across_runs() {
    let d = tmpdir("repro");
    let mut files = Vec::new();
    for i in 0..3 {
        let o = d.join(format!("m{i}.safetensors"));
        let (ok, _, err) = lopper(&["prune", "resnet8", "--remove-channels", "0.5", "-o", s(&o)]);
        assert!(ok, "{err}");
        files.push(std::fs::read(&o).unwrap());
    }
    // The embedded report holds latencies, which vary: compare models written by convert.
    let mut conv = Vec::new();
    for i in 0..3 {
        let o = d.join(format!("c{i}.safetensors"));
        let (ok, _, err) = lopper(&["convert", "resnet20", "-o", s(&o)]);
        assert!(ok, "{err}");
        conv.push(std::fs::read(&o).unwrap());
    }
    assert!(
        conv.windows(2).all(|w| w[0] == w[1]),
        "convert output differs between runs"
    );
    // The tensors of the pruned models agree too (only report timings may differ).
    let t: Vec<_> = files
        .iter()
        .map(|b| io::tensors_from_bytes(b, "m").unwrap().0)
        .collect();
    for (k, v) in &t[0] {
        let a: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = t[1][k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{k}");
    }
}

/// Children of `pid` (Linux), whichever of its threads started them (lopper's commands
/// run on a thread of its worker pool).
fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[test]
fn killing_a_run_kills_its_step_and_frees_the_directory() {
    let d = tmpdir("orphan");
    let recipe = d.join("r.toml");
    std::fs::write(
        &recipe,
        "name = \"orphan\"\n[data]\nname = \"digits\"\n[model]\nsource = \"resnet8\"\ntrain = { epochs = 200 }\n[finetune]\nepochs = 1\n[[methods]]\nname = \"l1\"\nmacs = [0.5]\n",
    )
    .unwrap();
    let out = d.join("out");
    let mut run = Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(["run", s(&recipe), "--out", s(&out)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let kid = loop {
        if let Some(&k) = children(run.id()).first() {
            break k;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no step child started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // A second run on the same directory is refused while the first works.
    let (ok, _, err) = lopper(&["run", s(&recipe), "--out", s(&out)]);
    assert!(!ok && err.contains("in use by another lopper run"), "{err}");
    run.kill().unwrap(); // SIGKILL
    run.wait().unwrap();
    let t = Instant::now();
    while Path::new(&format!("/proc/{kid}")).exists() {
        // A zombie (reaped by init later) has no task state to run: check its state.
        let st = std::fs::read_to_string(format!("/proc/{kid}/stat")).unwrap_or_default();
        if st.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the step outlived its run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The lock died with them: the directory can be used again (checked by taking the
    // lock, not by running the 200 epochs).
    // The kernel may release the lock a moment after the last holder became a zombie.
    let t = Instant::now();
    let r = loop {
        let r = lopper::recipe::run::RunLock::acquire(&out);
        if r.is_ok() || t.elapsed() > Duration::from_secs(5) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(r.is_ok(), "kid {kid}: {:?}", r.err());
}

// ---- silently accepted values ----------------------------------------------------------

#[test]
fn out_of_range_values_are_refused_with_the_range() {
    let cases: &[(&[&str], &str)] = &[
        (&["train", "resnet8", "--lr", "-1"], "must be > 0"),
        (&["train", "resnet8", "--lr", "0"], "must be > 0"),
        (&["train", "resnet8", "--momentum", "1"], "[0, 1)"),
        (&["train", "resnet8", "--momentum", "-0.1"], "[0, 1)"),
        (&["train", "resnet8", "--weight-decay", "-1"], ">= 0"),
        (&["train", "resnet8", "--label-smoothing", "1"], "[0, 1)"),
        (&["train", "resnet8", "--epochs", "0"], ">= 1"),
        (&["train", "resnet8", "--batch-size", "0"], ">= 1"),
        (
            &[
                "prune",
                "resnet8",
                "--remove-channels",
                "0.5",
                "--round-to",
                "0",
            ],
            ">= 1",
        ),
        (
            &[
                "prune",
                "resnet8",
                "--remove-channels",
                "0.5",
                "--steps",
                "0",
            ],
            ">= 1",
        ),
        (
            &["prune", "resnet8", "--remove-channels", "0.5", "--lamp"],
            "--scope global",
        ),
        (
            &[
                "prune",
                "resnet8",
                "--remove-channels",
                "0.5",
                "--calib",
                "0",
            ],
            ">= 1",
        ),
        (
            &[
                "prune",
                "resnet8",
                "--remove-channels",
                "0.5",
                "--eval-limit",
                "0",
            ],
            ">= 1",
        ),
        (
            &[
                "prune",
                "resnet8",
                "--remove-channels",
                "0.5",
                "--distill",
                "1.5",
            ],
            "[0, 1]",
        ),
        (&["prune", "resnet8", "--remove-channels", "1.2"], "[0, 1)"),
        (&["prune", "resnet8", "--keep-macs", "0"], "(0, 1]"),
        (
            &[
                "prune",
                "resnet8",
                "--remove-channels",
                "0.5",
                "--lr",
                "-0.1",
            ],
            "> 0",
        ),
        (
            &[
                "sparsify",
                "resnet8",
                "--sparsity",
                "0.5",
                "--pot-iters",
                "0",
            ],
            ">= 1",
        ),
        (
            &["sparsify", "resnet8", "--sparsity", "0.5", "--epochs", "0"],
            ">= 1",
        ),
        (
            &[
                "sparsify",
                "resnet8",
                "--sparsity",
                "0.5",
                "--batch-size",
                "0",
            ],
            ">= 1",
        ),
        (&["sparsify", "resnet8", "--sparsity", "1.0"], "[0, 1)"),
        (&["eval", "resnet8", "--batch-size", "0"], ">= 1"),
        (&["inspect", "resnet20#0"], "at least 1 class"),
    ];
    for (args, needle) in cases {
        refused(args, &[needle]);
    }
}

#[test]
fn bad_model_arguments_get_clear_errors() {
    let d = tmpdir("models");
    let m = d.join("m.safetensors");
    let (ok, _, err) = lopper(&["convert", "resnet8", "-o", s(&m)]);
    assert!(ok, "{err}");
    refused(
        &["eval", s(&m), "--weights", s(&m)],
        &["--weights", "saved model"],
    );
    refused(&["eval", s(&d)], &["is a directory"]);
    let empty = d.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    refused(&["inspect", s(&empty)], &["empty.onnx", "empty"]);
    // A 28x28 model with the default (8x8 digits) data: explain the missing --data.
    refused(
        &["prune", "digit_recognizer_cnn", "--remove-channels", "0.5"],
        &["1x28x28", "8x8", "--data"],
    );
    // A zoo model shaped for the default data that cannot take it.
    refused(
        &["prune", "lenet5", "--remove-channels", "0.5"],
        &[
            "shaped for the data 'digits'",
            "the default dataset",
            "--data",
        ],
    );
    // An integer-input ONNX model (token ids): refused by name.
    let g: Graph = lopper::zoo::build("mlp:8-4-2", 0).unwrap();
    let bytes = lopper::onnx::export::export_bytes(&g).unwrap();
    use protobuf::Message;
    let mut mp = onnx_protobuf::ModelProto::parse_from_bytes(&bytes).unwrap();
    let inp = &mut mp.graph.as_mut().unwrap().input[0];
    if let Some(onnx_protobuf::type_proto::Value::TensorType(t)) =
        inp.type_.as_mut().unwrap().value.as_mut()
    {
        t.elem_type = 7;
    }
    let ip = d.join("int.onnx");
    std::fs::write(&ip, mp.write_to_bytes().unwrap()).unwrap();
    refused(&["inspect", s(&ip)], &["int64", "floating-point input"]);
}

/// f32 → IEEE half, round to nearest (normal range only; tiny values flush to zero).
fn to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let e = ((b >> 23) & 0xff) as i32 - 127 + 15;
    if e <= 0 {
        return sign;
    }
    let m = (b & 0x7f_ffff) + 0x1000; // round
    let (e, m) = if m & 0x80_0000 != 0 {
        (e + 1, 0)
    } else {
        (e, m >> 13)
    };
    sign | ((e as u16) << 10) | (m as u16 & 0x3ff)
}

#[test]
fn f16_models_load_by_conversion() {
    use safetensors::tensor::{Dtype, TensorView};
    let d = tmpdir("f16");
    let g = lopper::zoo::build("mlp:64-16-10", 3).unwrap();
    let p = d.join("m.safetensors");
    io::save(&g, &p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let (t, meta) = io::tensors_from_bytes(&bytes, "m").unwrap();
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(k, v)| {
            let f: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            (
                k.clone(),
                v.dims().to_vec(),
                f.iter().flat_map(|x| to_f16(*x).to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let h = d.join("h.safetensors");
    std::fs::write(&h, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    let a = io::load(&h).unwrap();
    let x = candle_core::Tensor::randn(0f32, 1., (4, 64), &candle_core::Device::Cpu).unwrap();
    let ya: Vec<f32> = lopper::exec::forward(&a, &x, lopper::exec::Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let yg: Vec<f32> = lopper::exec::forward(&g, &x, lopper::exec::Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (p, q) in ya.iter().zip(&yg) {
        assert!((p - q).abs() < 2e-2, "{p} vs {q}");
    }
}

#[test]
fn recipes_pass_negative_values_to_the_range_check() {
    let d = tmpdir("recipe-neg");
    let recipe = d.join("r.toml");
    std::fs::write(
        &recipe,
        "name = \"neg\"\n[data]\nname = \"digits\"\ncalib = 128\n[model]\nsource = \"resnet8\"\n[finetune]\nepochs = 1\n[[methods]]\nname = \"unipts\"\nsparsity = [0.5]\noptions = { lr = -1 }\n",
    )
    .unwrap();
    let (ok, _, err) = lopper(&["run", s(&recipe), "--out", s(&d.join("out"))]);
    assert!(
        !ok && err.contains("--lr") && err.contains("must be > 0"),
        "{err}"
    );
}
