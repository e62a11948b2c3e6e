//! The shipped dense models (`models/`) are what their manifest says: every entry's file
//! exists with the recorded SHA-1, loads by name, and evaluates on the full test split to
//! exactly the recorded number of correct predictions. Every model file in `models/` has an
//! entry (no unexplained weights in the repository).

use serde::Deserialize;
use std::path::PathBuf;

mod common;

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    model: Vec<Entry>,
}

#[derive(Deserialize)]
#[allow(dead_code)] // provenance fields are read by people, checked for presence here
struct Entry {
    name: String,
    file: String,
    sha1: String,
    data: String,
    /// A class subset (`--classes`), for models trained on part of a dataset.
    #[serde(default)]
    classes: Option<String>,
    correct: usize,
    total: usize,
    command: String,
    seconds: Option<f64>,
    cpu: String,
    date: String,
}

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(models_dir().join("models.toml")).unwrap();
    toml::from_str(&text).unwrap()
}

#[test]
fn every_shipped_model_matches_its_checksum_and_accuracy() {
    let m = manifest();
    for e in &m.model {
        let path = models_dir().join(&e.file);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|_| panic!("{} is missing", path.display()));
        assert_eq!(
            sha1_smol::Sha1::from(&bytes).digest().to_string(),
            e.sha1,
            "{}",
            e.name
        );
        assert!(
            e.command.starts_with("lopper train ") && !e.cpu.is_empty(),
            "{}",
            e.name
        );
        assert!(
            lopper::zoo::SHIPPED.contains(&e.name.as_str()),
            "{} is not in zoo::SHIPPED",
            e.name
        );
        // By name, as a user would load it.
        let mut args = vec!["eval", &e.name, "--data", &e.data, "--json", "--quiet"];
        if let Some(c) = &e.classes {
            args.extend(["--classes", c]);
        }
        let (ok, out, err) = common::lopper_cli(&args);
        assert!(ok, "{}: {err}", e.name);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["result"]["n"].as_u64().unwrap() as usize,
            e.total,
            "{}",
            e.name
        );
        assert_eq!(
            v["result"]["correct"].as_u64().unwrap() as usize,
            e.correct,
            "{}: recorded {}/{}",
            e.name,
            e.correct,
            e.total
        );
    }
}

#[test]
fn every_model_file_has_a_manifest_entry() {
    let m = manifest();
    for f in std::fs::read_dir(models_dir()).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().to_string();
        if name.ends_with(".safetensors") {
            assert!(
                m.model.iter().any(|e| e.file == name),
                "models/{name} has no entry in models/models.toml"
            );
        }
    }
    for name in lopper::zoo::SHIPPED {
        assert!(
            m.model.iter().any(|e| e.name == *name) || lopper::zoo::shipped(name).is_none(),
            "{name} is listed as shipped and present but has no manifest entry"
        );
    }
}
