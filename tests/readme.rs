//! Every command the README shows still works. Each `lopper …` line of the README's shell
//! blocks (continuation lines joined, comments dropped) must parse — its subcommand, flags
//! and values — with the binary's `LOPPER_PARSE_ONLY` switch; the ones whose inputs exist
//! (zoo, shipped and shared models, the shared data) are also *run*, shortened (one epoch,
//! a few hundred samples), in a scratch directory. Scripts and examples the README names
//! must exist. A renamed flag or a moved file fails here, not in a reader's terminal.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The README's shell commands: one string per command, continuation lines joined,
/// `# comments` removed.
fn commands() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut cur = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        // A comment starts at a '#' at the line start or after whitespace.
        let code = match line.find(" #") {
            Some(i) => &line[..i],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        let code = code.trim_end();
        if let Some(head) = code.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(code);
        let c = cur.split_whitespace().collect::<Vec<_>>().join(" ");
        if !c.is_empty() {
            out.push(c);
        }
        cur.clear();
    }
    out
}

/// The shortened form of a command's arguments, for running it in a test.
fn shorten(args: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let val = args.get(i + 1).cloned().unwrap_or_default();
        let set = |v: &str| vec![a.clone(), v.to_string()];
        let pair = match a.as_str() {
            "--epochs" | "--finetune-epochs" | "--step-epochs" => Some(set("1")),
            "--iterations" => Some(set("2")),
            "--calib" | "--block-ft-samples" | "--set-size" => Some(set(&val
                .parse::<usize>()
                .map_or(val.clone(), |n| n.min(128).to_string()))),
            "--train-limit" => Some(set("256")),
            "--eval-limit" => Some(set("300")),
            _ => None,
        };
        match pair {
            Some(p) => {
                out.extend(p);
                i += 2;
            }
            None => {
                out.push(a.clone());
                i += 1;
            }
        }
    }
    let cmd = out[0].clone();
    let has = |out: &[String], f: &str| out.iter().any(|a| a == f);
    if ["train", "prune"].contains(&cmd.as_str()) && !has(&out, "--train-limit") {
        out.extend(["--train-limit".into(), "256".into()]);
    }
    if ["prune", "sparsify", "eval", "sensitivity"].contains(&cmd.as_str())
        && !has(&out, "--eval-limit")
    {
        out.extend(["--eval-limit".into(), "300".into()]);
    }
    out
}

/// Whether a command can run here: its model exists (a zoo, shipped or shared name, or a
/// file) and it is not one of the long jobs tested elsewhere (demo, run, bench).
fn runnable(args: &[String], cwd: &Path) -> bool {
    if ["demo", "run", "bench"].contains(&args[0].as_str()) {
        return false;
    }
    // A GPU command needs a GPU (it is still parsed).
    if args
        .windows(2)
        .any(|w| w[0] == "--device" && w[1].starts_with("cuda"))
    {
        return false;
    }
    let Some(model) = args.get(1 + usize::from(args[0] == "stamp")) else {
        return false;
    };
    let file = model.contains('/') || model.ends_with(".safetensors") || model.ends_with(".onnx");
    // Every file a flag reads (not the one `-o` writes) must exist.
    let inputs_exist = args.windows(2).all(|w| {
        let is_file = [".safetensors", ".onnx", ".f32"]
            .iter()
            .any(|e| w[1].ends_with(e));
        !is_file || ["-o", "--output"].contains(&w[0].as_str()) || cwd.join(&w[1]).exists()
    });
    if file {
        cwd.join(model).exists() && inputs_exist
    } else {
        model
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-:@x".contains(c))
            && model != "MODEL"
            && !(lopper::zoo::SHIPPED.contains(&model.as_str())
                && lopper::zoo::shipped(model).is_none())
            && inputs_exist
    }
}

#[test]
fn every_readme_command_parses_and_the_runnable_ones_run() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_lopper"));
    let scratch = common::fresh_dir("readme", "cmds");
    // Paths in the README are relative to the repository root; the scratch directory
    // sees the repository's files through links, and outputs land in it.
    for entry in ["models", "recipes", "bench"] {
        let _ = std::os::unix::fs::symlink(root().join(entry), scratch.join(entry));
    }
    let data = lopper::data::data_dir().canonicalize().unwrap();
    let (mut parsed, mut ran) = (0, 0);
    let mut failures = Vec::new();
    for c in commands() {
        let words: Vec<String> = c.split(' ').map(String::from).collect();
        let args: Vec<String> = match words[0].as_str() {
            "lopper" => words[1..].to_vec(),
            "cargo" if c.starts_with("cargo run --release -- ") => words[4..].to_vec(),
            "cargo" => {
                if let Some(i) = words.iter().position(|w| w == "--example") {
                    let ex = root().join("examples").join(format!("{}.rs", words[i + 1]));
                    assert!(
                        ex.exists(),
                        "README names example {}, which is missing",
                        words[i + 1]
                    );
                }
                continue;
            }
            w if w.starts_with("bench/") || w.starts_with("python3") || w.ends_with(".py") => {
                for s in words
                    .iter()
                    .filter(|w| w.starts_with("bench/") || w.starts_with("tests/"))
                {
                    let s = s.trim_end_matches(';');
                    assert!(
                        root().join(s).exists(),
                        "README names {s}, which is missing"
                    );
                }
                continue;
            }
            _ => continue,
        };
        // The README's relative data paths point at ../shared from the repo root.
        let args: Vec<String> = args
            .into_iter()
            .map(|a| a.replace("../shared/data", &data.display().to_string()))
            .collect();
        let out = Command::new(&exe)
            .args(&args)
            .current_dir(&scratch)
            .env("LOPPER_PARSE_ONLY", "1")
            .output()
            .unwrap();
        parsed += 1;
        if !out.status.success() {
            failures.push(format!(
                "{c}\n  does not parse: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        }
        if !runnable(&args, &scratch) {
            continue;
        }
        let short = shorten(&args);
        let out = Command::new(&exe)
            .args(&short)
            .arg("--quiet")
            .current_dir(&scratch)
            .env("LOPPER_DATA", &data)
            .output()
            .unwrap();
        ran += 1;
        if !out.status.success() {
            failures.push(format!(
                "{c}\n  run as `lopper {}` failed: {}",
                short.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // Not vacuous: the README has dozens of commands and many run here.
    assert!(parsed >= 25 && ran >= 7, "parsed {parsed}, ran {ran}");
}

#[test]
fn the_extractor_joins_continuations_and_drops_comments() {
    let cmds = commands();
    assert!(cmds
        .iter()
        .any(|c| c.starts_with("lopper prune m.onnx --data none")));
    assert!(cmds.iter().all(|c| !c.contains('\\') && !c.contains(" # ")));
    assert_eq!(
        shorten(&[
            "train".into(),
            "lenet5".into(),
            "--epochs".into(),
            "3".into()
        ])[2..4],
        ["--epochs", "1"]
    );
}
