//! Executes a recipe: the dense model (trained if asked), then one step per
//! (method, budget, seed), each a `lopper prune` / `lopper sparsify` child process whose
//! JSON report is cached in `OUT/steps/ID.json` together with the exact arguments. A step
//! whose cache holds the same arguments is not run again, so an interrupted run resumes
//! where it stopped; changing a step's settings reruns only that step.

use super::{html, Recipe};
use crate::util::atomic_write;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub struct RunOpts {
    pub out: PathBuf,
    /// The lopper executable to run steps with.
    pub exe: PathBuf,
    pub data_dir: Option<PathBuf>,
    pub progress: bool,
}

/// One planned step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub id: String,
    pub label: String,
    pub method: String,
    /// "prune" (budget = kept MACs fraction) or "sparsify" (budget = sparsity).
    pub kind: String,
    pub budget: f64,
    pub seed: u64,
    pub args: Vec<String>,
}

/// A finished step as cached.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepResult {
    pub step: Step,
    pub report: serde_json::Value,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub recipe: Recipe,
    pub dense: serde_json::Value,
    pub steps: Vec<StepResult>,
    /// Steps run by this invocation (the rest came from the cache).
    pub ran: Vec<String>,
    pub machine: serde_json::Value,
    pub seconds: f64,
}

fn opt_str(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(_) => None,
        other => Some(other.to_string()),
    }
}

fn data_args(r: &Recipe, o: &RunOpts) -> Vec<String> {
    let mut a = vec!["--data".to_string(), r.data.name.clone()];
    if let Some(d) = &o.data_dir {
        a.extend(["--data-dir".into(), d.display().to_string()]);
    }
    if let Some(s) = &r.data.input_scale {
        a.extend(["--input-scale".into(), s.clone()]);
    }
    a
}

/// The steps of a recipe, in order, for the dense model at `dense`.
pub fn plan(r: &Recipe, dense: &Path, o: &RunOpts) -> Vec<Step> {
    let mut steps = Vec::new();
    for m in &r.methods {
        let name = m.name.get_ref().clone();
        let sparse = m.is_sparsity();
        let budgets = if sparse {
            m.sparsity.as_ref().map(|b| b.get_ref().clone())
        } else {
            m.macs.as_ref().map(|b| b.get_ref().clone())
        }
        .unwrap_or_default();
        for &b in &budgets {
            for &seed in &r.seeds {
                let label = m.label();
                let id = format!(
                    "{}-{}{}-s{seed}",
                    label.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
                    if sparse { "sp" } else { "macs" },
                    b
                );
                let mut args = vec![
                    if sparse { "sparsify" } else { "prune" }.to_string(),
                    dense.display().to_string(),
                ];
                args.extend(data_args(r, o));
                args.extend(["--method".into(), name.clone()]);
                if sparse {
                    args.extend(["--sparsity".into(), b.to_string()]);
                    if let Some(c) = r.data.calib {
                        args.extend(["--calib".into(), c.to_string()]);
                    }
                } else {
                    args.extend(["--target-macs".into(), b.to_string()]);
                    args.extend([
                        "--finetune-epochs".into(),
                        r.finetune.epochs.to_string(),
                        "--lr".into(),
                        r.finetune.lr.to_string(),
                    ]);
                    if let Some(n) = r.data.train_limit {
                        args.extend(["--train-limit".into(), n.to_string()]);
                    }
                }
                if let Some(n) = r.data.eval_limit {
                    args.extend(["--eval-limit".into(), n.to_string()]);
                }
                args.extend(["--seed".into(), seed.to_string()]);
                for (k, v) in &m.options {
                    let flag = format!("--{}", k.replace('_', "-"));
                    match (v, opt_str(v)) {
                        (toml::Value::Boolean(true), _) => args.push(flag),
                        (toml::Value::Boolean(false), _) => {}
                        (_, Some(s)) => args.extend([flag, s]),
                        _ => {}
                    }
                }
                let model = o.out.join("steps").join(format!("{id}.safetensors"));
                args.extend(["--json".into(), "-o".into(), model.display().to_string()]);
                steps.push(Step {
                    id,
                    label,
                    method: name.clone(),
                    kind: if sparse { "sparsify" } else { "prune" }.into(),
                    budget: b,
                    seed,
                    args,
                });
            }
        }
    }
    steps
}

/// Runs a child lopper and parses its JSON stdout.
fn child(o: &RunOpts, args: &[String], what: &str) -> Result<serde_json::Value> {
    let out = Command::new(&o.exe)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", o.exe.display()))?;
    if !out.status.success() {
        bail!(
            "{what} failed (lopper {}):\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{what}: the child printed no JSON report"))
}

/// Cached value keyed by its arguments: runs `f` only if `path` lacks a matching record.
fn cached<T: Serialize + for<'de> Deserialize<'de>>(
    path: &Path,
    args: &[String],
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, bool)> {
    #[derive(Serialize, Deserialize)]
    struct Rec<T> {
        args: Vec<String>,
        value: T,
    }
    if let Ok(txt) = std::fs::read_to_string(path) {
        if let Ok(r) = serde_json::from_str::<Rec<T>>(&txt) {
            if r.args == args {
                return Ok((r.value, false));
            }
        }
    }
    let value = f()?;
    let rec = Rec {
        args: args.to_vec(),
        value,
    };
    atomic_write(path, serde_json::to_string_pretty(&rec)?.as_bytes())?;
    Ok((rec.value, true))
}

/// Runs (or resumes) a recipe; writes `report.json` and `report.html` into `o.out`.
pub fn run(r: &Recipe, o: &RunOpts) -> Result<RunReport> {
    let t0 = Instant::now();
    std::fs::create_dir_all(o.out.join("steps"))
        .with_context(|| format!("cannot create {}", o.out.display()))?;
    let log = |m: String| {
        if o.progress {
            eprintln!("{m}");
        }
    };
    // The dense model: trained here if the recipe says so, else used as given.
    let dense_path = match &r.model.train {
        Some(t) => {
            let p = o.out.join("dense.safetensors");
            let mut args = vec!["train".to_string(), r.model.source.clone()];
            args.extend(data_args(r, o));
            args.extend([
                "--epochs".into(),
                t.epochs.to_string(),
                "--lr".into(),
                t.lr.to_string(),
                "--batch-size".into(),
                t.batch_size.to_string(),
                "--seed".into(),
                r.seeds[0].to_string(),
                "--json".into(),
                "-o".into(),
                p.display().to_string(),
            ]);
            let (_, ran) = cached(&o.out.join("dense.train.json"), &args, || {
                log(format!(
                    "training the dense model: lopper {}",
                    args.join(" ")
                ));
                child(o, &args, "training the dense model")
            })?;
            if !ran && !p.exists() {
                bail!(
                    "{}: cached dense training but the model file is gone; delete dense.train.json",
                    o.out.display()
                );
            }
            p.display().to_string()
        }
        None => r.model.source.clone(),
    };
    let mut eval_args = vec!["eval".to_string(), dense_path.clone()];
    eval_args.extend(data_args(r, o));
    eval_args.push("--json".into());
    let (dense, _) = cached(&o.out.join("dense.eval.json"), &eval_args, || {
        log("evaluating the dense model".into());
        let mut v = child(o, &eval_args, "evaluating the dense model")?;
        let insp = vec!["inspect".to_string(), dense_path.clone(), "--json".into()];
        if let Ok(c) = child(o, &insp, "inspecting the dense model") {
            v["cost"] = serde_json::json!({"macs": c["total_macs"], "params": c["total_params"]});
        }
        Ok(v)
    })?;
    let steps = plan(r, Path::new(&dense_path), o);
    let mut results = Vec::new();
    let mut ran = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let path = o.out.join("steps").join(format!("{}.json", s.id));
        let (res, did) = cached(&path, &s.args, || {
            log(format!(
                "[{}/{}] {}: lopper {}",
                i + 1,
                steps.len(),
                s.id,
                s.args.join(" ")
            ));
            let t = Instant::now();
            let report = child(o, &s.args, &format!("step {}", s.id))?;
            Ok(StepResult {
                step: s.clone(),
                report,
                seconds: t.elapsed().as_secs_f64(),
            })
        })?;
        if did {
            ran.push(s.id.clone());
        } else {
            log(format!("[{}/{}] {}: cached", i + 1, steps.len(), s.id));
        }
        results.push(res);
    }
    let rep = RunReport {
        recipe: r.clone(),
        dense,
        steps: results,
        ran,
        machine: serde_json::json!({
            "threads": rayon::current_num_threads(),
            "cpu": cpu_model(),
            "os": std::env::consts::OS,
        }),
        seconds: t0.elapsed().as_secs_f64(),
    };
    atomic_write(
        &o.out.join("report.json"),
        serde_json::to_string_pretty(&rep)?.as_bytes(),
    )?;
    atomic_write(&o.out.join("report.html"), html::render(&rep).as_bytes())?;
    Ok(rep)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The default output directory of a recipe: `runs/<name>`.
pub fn default_out(r: &Recipe) -> Result<PathBuf> {
    if r.name.is_empty() || r.name.contains(['/', '\\']) || r.name.starts_with('.') {
        return Err(anyhow!("recipe name '{}' cannot name a directory", r.name));
    }
    Ok(PathBuf::from("runs").join(&r.name))
}
