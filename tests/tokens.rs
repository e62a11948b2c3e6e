//! The tokenizer-free path on real data: the 8×8 digits read as 64 tokens (pixel values
//! 0..16, vocabulary 17), written as `np.save`-style `.npy` arrays named after the model's
//! inputs; a Hugging Face BERT classifier (random init, `tests/fixtures/bert_digits.onnx`)
//! is fine-tuned, evaluated, sparsified and pruned on them through the CLI, and bad token
//! data gets errors naming the file or the input.

mod common;

use common::{lopper_cli as lopper, macs_kept};
use lopper::data::{self, npy::int64_bytes, Split};
use std::path::{Path, PathBuf};

fn bert() -> String {
    format!(
        "{}/tests/fixtures/bert_digits.onnx",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `dir/{train,test}/{input_ids,labels}.npy` from the embedded digits.
fn digit_tokens(dir: &Path) {
    for split in [Split::Train, Split::Test] {
        let ds = data::load("digits", split, None).unwrap();
        let d = dir.join(split.name());
        std::fs::create_dir_all(&d).unwrap();
        let ids: Vec<i64> = (0..ds.len())
            .flat_map(|i| ds.pixels(i).iter().map(|&p| p as i64).collect::<Vec<_>>())
            .collect();
        let labels: Vec<i64> = (0..ds.len()).map(|i| ds.label(i) as i64).collect();
        std::fs::write(d.join("input_ids.npy"), int64_bytes(&[ds.len(), 64], &ids)).unwrap();
        std::fs::write(d.join("labels.npy"), int64_bytes(&[ds.len()], &labels)).unwrap();
    }
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn a_bert_classifier_fine_tunes_evaluates_sparsifies_and_prunes_on_token_files() {
    let dir = common::fresh_dir("tokens", "digits");
    digit_tokens(&dir);
    let d = dir.to_str().unwrap();
    let trained: PathBuf = dir.join("bert.onnx");
    let t = trained.to_str().unwrap();
    let (ok, out, err) = lopper(&[
        "train",
        &bert(),
        "--data",
        d,
        "--epochs",
        "12",
        "--optimizer",
        "adamw",
        "--lr",
        "4e-3",
        "--weight-decay",
        "0.05",
        "--warmup-epochs",
        "1",
        "--batch-size",
        "32",
        "-o",
        t,
        "--json",
    ]);
    assert!(ok, "{err}");
    let top1 = json(&out)["test"]["top1"].as_f64().unwrap();
    // Ten classes: chance is 10 %.
    assert!(top1 > 0.4, "fine-tuned top-1 {top1}");

    let (ok, out, err) = lopper(&["eval", t, "--data", d, "--json"]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["result"]["n"], 360);
    assert!((v["result"]["top1"].as_f64().unwrap() - top1).abs() < 1e-9);

    // Calibration from the token files (Wanda reads every Linear's input norms).
    let (ok, out, err) = lopper(&[
        "sparsify",
        t,
        "--data",
        d,
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert!(v["result"]["sparsity"].as_f64().unwrap() > 0.45, "{out}");
    assert!(v["result"]["top1"].as_f64().unwrap() > 0.1, "{out}");

    // Structured: i-SpaSP over heads and FFN units, with a fine-tuning epoch.
    let (ok, out, err) = lopper(&[
        "prune",
        t,
        "--data",
        d,
        "--method",
        "ispasp",
        "--target-macs",
        "0.5",
        "--finetune-epochs",
        "1",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert!(macs_kept(&v) <= 0.5 + 1e-9, "{out}");
    assert!(v["result"]["top1"].as_f64().unwrap() > 0.1, "{out}");
}

#[test]
fn bad_token_data_names_the_file_or_the_input() {
    let dir = common::fresh_dir("tokens", "bad");
    digit_tokens(&dir);
    let d = dir.to_str().unwrap();
    // Images into a token model.
    let (ok, _, err) = lopper(&["eval", &bert(), "--data", "digits"]);
    assert!(!ok && err.contains("token inputs"), "{err}");
    // An array not named after the model's input.
    let test = dir.join("test");
    std::fs::rename(test.join("input_ids.npy"), test.join("ids.npy")).unwrap();
    let (ok, _, err) = lopper(&["eval", &bert(), "--data", d]);
    assert!(
        !ok && err.contains("'input_ids'") && err.contains("ids"),
        "{err}"
    );
    std::fs::rename(test.join("ids.npy"), test.join("input_ids.npy")).unwrap();
    // A truncated label file.
    let labels = std::fs::read(test.join("labels.npy")).unwrap();
    std::fs::write(test.join("labels.npy"), &labels[..labels.len() - 16]).unwrap();
    let (ok, _, err) = lopper(&["eval", &bert(), "--data", d]);
    assert!(
        !ok && err.contains("labels.npy") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(test.join("labels.npy"), &labels).unwrap();
    // A token id outside the vocabulary names the table.
    let mut ids = vec![0i64; 360 * 64];
    ids[5] = 40;
    std::fs::write(test.join("input_ids.npy"), int64_bytes(&[360, 64], &ids)).unwrap();
    let (ok, _, err) = lopper(&["eval", &bert(), "--data", d]);
    assert!(!ok && err.contains("token id 40"), "{err}");
    // Image augmentation asked of token data.
    let (ok, _, err) = lopper(&[
        "train",
        &bert(),
        "--data",
        d,
        "--epochs",
        "1",
        "--augment",
        "true",
    ]);
    assert!(!ok && err.contains("augmentation"), "{err}");
}
