//! Recipes: errors naming line and key, a small real run with caching, resuming after a
//! kill without redoing finished steps, and the HTML report rendered by a real headless
//! browser (Debian's chromium, when installed; `.ci/run` installs it).

use lopper::recipe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TINY: &str = r#"
name = "tiny"
[data]
name = "digits"
calib = 256
[model]
source = "resnet8"
train = { epochs = 2 }
[finetune]
epochs = 1
[[methods]]
name = "l1"
keep_macs = [0.5, 0.7]
[[methods]]
name = "magnitude"
sparsity = [0.7]
[[methods]]
name = "unipts"
sparsity = [0.7]
options = { epochs = 1, ga-pop = 3, ga-gens = 1, ga-parents = 2, ga-children = 1 }
"#;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lopper-recipe-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err(src: &str) -> String {
    format!("{:#}", recipe::parse(src, "r.toml").unwrap_err())
}

#[test]
fn bad_recipes_name_the_line_and_key() {
    assert!(recipe::parse(TINY, "r.toml").is_ok());
    let e = err(&TINY.replace("name = \"magnitude\"", "name = \"magic\""));
    assert!(
        e.contains("r.toml (line 15)") && e.contains("unknown method 'magic'"),
        "{e}"
    );
    let e = err(&TINY.replace("calib = 256", "calib = \"many\""));
    assert!(e.contains("line 5") && e.contains("invalid type"), "{e}");
    let e = err(&TINY.replace("name = \"digits\"\n", ""));
    assert!(
        e.contains("missing field `name`") && e.contains("line"),
        "{e}"
    );
    let e = err(&TINY.replace("keep_macs = [0.5, 0.7]", "keep_macs = [0.5, 1.5]"));
    assert!(
        e.contains("line 13") && e.contains("key 'keep_macs'") && e.contains("1.5"),
        "{e}"
    );
    let e = err(&TINY.replace(
        "sparsity = [0.7]\n[[methods]]\nname = \"unipts\"",
        "macs = [0.7]\n[[methods]]\nname = \"unipts\"",
    ));
    assert!(e.contains("needs key 'sparsity'"), "{e}");
    let e = err(&TINY.replace(
        "[finetune]\nepochs = 1",
        "[finetune]\nepochs = 1\nepoch = 2",
    ));
    assert!(
        e.contains("unknown field `epoch`") && e.contains("line 11"),
        "{e}"
    );
    // STAMP without a generator is meta-trained by the run; its `meta-` options belong
    // to STAMP alone and not beside a given generator.
    let stamp = TINY.replace("name = \"l1\"", "name = \"stamp\"");
    let r = lopper::recipe::parse(&stamp, "r.toml").unwrap();
    assert!(r.methods[0].needs_meta_training());
    let e = err(&TINY.replace(
        "keep_macs = [0.5, 0.7]",
        "keep_macs = [0.5, 0.7]\noptions = { meta-iterations = 5 }",
    ));
    assert!(
        e.contains("line 12") && e.contains("'meta-iterations' is for method 'stamp'"),
        "{e}"
    );
    let e = err(&stamp.replace(
        "keep_macs = [0.5, 0.7]",
        "keep_macs = [0.5, 0.7]\noptions = { generator = \"g.safetensors\", meta-iterations = 5 }",
    ));
    assert!(e.contains("drop one of the two"), "{e}");
    let o = lopper::recipe::run::RunOpts {
        out: "OUT".into(),
        exe: "lopper".into(),
        data_dir: None,
        device: None,
    };
    let stamp = stamp.replace(
        "keep_macs = [0.5, 0.7]",
        "keep_macs = [0.5]\noptions = { meta-iterations = 5, set-size = 20 }",
    );
    let r = lopper::recipe::parse(&stamp, "r.toml").unwrap();
    let meta = lopper::recipe::run::meta_training(&r, std::path::Path::new("d.safetensors"), &o);
    assert_eq!(meta.len(), 1);
    let (_, g, args) = &meta[0];
    assert_eq!(args[..3], ["stamp", "meta-train", "d.safetensors"]);
    assert!(args.contains(&"--iterations=5".to_string()), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--set-size")),
        "{args:?}"
    );
    let steps = lopper::recipe::run::plan(&r, std::path::Path::new("d.safetensors"), &o);
    let gen = format!("--generator={}", g.display());
    assert!(steps[0].args.contains(&gen), "{:?}", steps[0].args);
    assert!(steps[0].args.contains(&"--set-size=20".to_string()));
    assert!(!steps[0].args.iter().any(|a| a.contains("iterations")));
    let e = err("name = [");
    assert!(e.contains("r.toml (line 1)"), "{e}");
}

fn lopper() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lopper"))
}

/// `lopper run RECIPE --out OUT --json`, waited for.
fn run(recipe: &Path, out: &Path) -> std::process::Output {
    lopper()
        .args([
            "run",
            recipe.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap()
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Accuracy and cost of every step of a finished run, by id.
fn results(out: &Path) -> Vec<(String, serde_json::Value)> {
    let r = read_json(&out.join("report.json"));
    r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let rep = &s["report"];
            let acc = rep["result"]["top1"].clone();
            (s["step"]["id"].as_str().unwrap().to_string(), acc)
        })
        .collect()
}

#[test]
fn a_killed_run_resumes_without_redoing_finished_steps() {
    let d = tmpdir("resume");
    let rp = d.join("tiny.toml");
    std::fs::write(&rp, TINY).unwrap();
    // Uninterrupted reference run.
    let full = d.join("full");
    let o = run(&rp, &full);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = results(&full);
    assert_eq!(want.len(), 4);
    // A second run of the same recipe only reads the cache.
    let o = run(&rp, &full);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ran"].as_array().unwrap().len(), 0);
    // Kill a run once its first step is cached.
    let part = d.join("part");
    let mut child = lopper()
        .args([
            "run",
            rp.to_str().unwrap(),
            "--out",
            part.to_str().unwrap(),
            "--json",
        ])
        .spawn()
        .unwrap();
    let t = Instant::now();
    let first = part.join("steps").join("l1-macs0.5-s0.json");
    while !first.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "first step never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stamp = std::fs::metadata(&first).unwrap().modified().unwrap();
    let done_before: Vec<String> = std::fs::read_dir(part.join("steps"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json"))
        .collect();
    assert!(
        done_before.len() < 4,
        "the run finished before it was killed"
    );
    let o = run(&rp, &part);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ran: Vec<&str> = v["ran"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for f in &done_before {
        assert!(
            !ran.contains(&f.trim_end_matches(".json")),
            "{f} was redone"
        );
    }
    assert_eq!(
        std::fs::metadata(&first).unwrap().modified().unwrap(),
        stamp
    );
    assert_eq!(
        results(&part),
        want,
        "resumed run differs from the uninterrupted one"
    );
    // Changing one step's settings reruns that step only.
    std::fs::write(
        &rp,
        TINY.replace("keep_macs = [0.5, 0.7]", "keep_macs = [0.5, 0.6]"),
    )
    .unwrap();
    let o = run(&rp, &part);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ran"], serde_json::json!(["l1-macs0.6-s0"]));
    // The report is self-contained.
    let html = std::fs::read_to_string(full.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("top-1 vs MACs") && html.contains("unipts"));
    let external =
        html.matches("http").count() - html.matches("http://www.w3.org/2000/svg").count();
    assert_eq!(external, 0, "the report references external resources");
    browser_renders(&full.join("report.html"), &d);
    std::fs::remove_dir_all(&d).ok();
}

/// Screenshots the report in headless chromium and checks the render is not blank: its PNG
/// is several times the size of a blank page's at the same window size.
fn browser_renders(html: &Path, dir: &Path) {
    let Some(chrome) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        eprintln!(
            "no chromium installed: browser check skipped (.ci/run installs Debian's chromium)"
        );
        return;
    };
    let shot = |page: &Path, png: &Path| {
        let o = Command::new(chrome)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1100,2400",
                &format!("--screenshot={}", png.display()),
                &format!("file://{}", page.display()),
            ])
            .output()
            .unwrap();
        assert!(
            png.exists(),
            "chromium wrote no screenshot: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::metadata(png).unwrap().len()
    };
    let blank = dir.join("blank.html");
    std::fs::write(&blank, "<!DOCTYPE html><html><body></body></html>").unwrap();
    let b = shot(&blank, &dir.join("blank.png"));
    let r = shot(html, &dir.join("report.png"));
    assert!(
        r > 5 * b && r > 20_000,
        "report screenshot {r} bytes vs blank {b}"
    );
}

/// Every shipped recipe parses; the MNIST ones also run end to end in a shrunken form
/// (fewer samples, one epoch, the first budget of each method).
#[test]
fn shipped_recipes_parse_and_small_variants_run() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let d = tmpdir("shipped");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        n += 1;
        let r = recipe::load(&p).unwrap();
        if r.data.name != "mnist" {
            continue;
        }
        let mut v: toml::Value = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let data = v["data"].as_table_mut().unwrap();
        data.insert("eval_limit".into(), 1000.into());
        data.insert("train_limit".into(), 2000.into());
        data.insert("calib".into(), 256.into());
        if let Some(t) = v["model"].get_mut("train") {
            t.as_table_mut().unwrap().insert("epochs".into(), 1.into());
        }
        if let Some(f) = v.get_mut("finetune") {
            f.as_table_mut().unwrap().insert("epochs".into(), 1.into());
        }
        for m in v["methods"].as_array_mut().unwrap() {
            let m = m.as_table_mut().unwrap();
            for key in ["keep_macs", "sparsity"] {
                if let Some(b) = m.get_mut(key) {
                    let first = b.as_array().unwrap()[0].clone();
                    *b = toml::Value::Array(vec![first]);
                }
            }
            if let Some(o) = m.get_mut("options") {
                let o = o.as_table_mut().unwrap();
                for (k, val) in [
                    ("finetune-epochs", 1),
                    ("epochs", 1),
                    ("pot-iters", 1),
                    ("iterations", 5),
                ] {
                    if o.contains_key(k) {
                        o.insert(k.into(), val.into());
                    }
                }
            }
            if m["name"].as_str() == Some("unipts") {
                let o = m
                    .entry("options")
                    .or_insert(toml::Value::Table(Default::default()));
                let o = o.as_table_mut().unwrap();
                for (k, val) in [
                    ("finetune-epochs", 1),
                    ("ga-pop", 3),
                    ("ga-gens", 1),
                    ("ga-parents", 2),
                    ("ga-children", 1),
                ] {
                    o.insert(k.into(), val.into());
                }
            }
            if m["name"].as_str() == Some("ispasp") {
                let o = m
                    .entry("options")
                    .or_insert(toml::Value::Table(Default::default()));
                o.as_table_mut()
                    .unwrap()
                    .insert("iterations".into(), 5.into());
            }
        }
        let small = d.join(p.file_name().unwrap());
        std::fs::write(&small, toml::to_string(&v).unwrap()).unwrap();
        let out = d.join(format!("{}-out", r.name));
        let o = run(&small, &out);
        assert!(
            o.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let res = results(&out);
        assert!(!res.is_empty());
        for (id, acc) in res {
            assert!(
                acc.as_f64().unwrap() > 0.5,
                "{}: step {id} accuracy {acc}",
                r.name
            );
        }
    }
    assert!(n >= 4, "expected the shipped recipes in {}", dir.display());
    std::fs::remove_dir_all(&d).ok();
}
