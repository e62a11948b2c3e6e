//! Executes a recipe: the dense model (trained if asked), then one step per
//! (method, budget, seed), each a `lopper prune` / `lopper sparsify` child process whose
//! JSON report is cached in `OUT/steps/ID.json` together with the exact arguments. A step
//! whose cache holds the same arguments is not run again, so an interrupted run resumes
//! where it stopped; changing a step's settings reruns only that step.

pub use super::report::{DenseCost, DenseEval, Machine, RunReport, Step, StepKind, StepResult};
use super::{html, Recipe};
use crate::util::{atomic_write, human_secs, Progress};
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
    /// `--device` for every step that runs a model (`None`: the CPU).
    pub device: Option<String>,
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
    // Every step given the data runs a model (train, eval, prune, sparsify, stamp).
    if let Some(d) = &o.device {
        a.extend(["--device".into(), d.clone()]);
    }
    a
}

/// Where the run keeps the generator it meta-trains for a STAMP method (by label).
fn generator_path(o: &RunOpts, label: &str) -> PathBuf {
    o.out
        .join("stamp")
        .join(format!("{}-generator.safetensors", file_safe(label)))
}

/// A method label as part of a file name (step ids, generator files).
fn file_safe(label: &str) -> String {
    label.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
}

/// The `lopper stamp meta-train` runs a recipe needs before its steps: one per STAMP
/// method without a `generator` option, on the dense model and the recipe's data, with its
/// `meta-KEY` options as `--KEY`. Returns (label, output generator, arguments).
pub fn meta_training(r: &Recipe, dense: &Path, o: &RunOpts) -> Vec<(String, PathBuf, Vec<String>)> {
    r.methods
        .iter()
        .filter(|m| m.needs_meta_training())
        .map(|m| {
            let label = m.label();
            let out = generator_path(o, &label);
            let mut args = vec![
                "stamp".to_string(),
                "meta-train".into(),
                dense.display().to_string(),
            ];
            args.extend(data_args(r, o));
            args.extend(["--seed".into(), r.seeds[0].to_string()]);
            for (k, v) in &m.options {
                if let Some(key) = k.strip_prefix("meta-") {
                    push_option(&mut args, key, v);
                }
            }
            args.extend(["--json".into(), "-o".into(), out.display().to_string()]);
            (label, out, args)
        })
        .collect()
}

/// `key = true` → `--key`; `key = false` → nothing; else one `--key=value` word (a value
/// such as `-1` must not parse as a flag: it reaches the child's range check instead).
fn push_option(args: &mut Vec<String>, key: &str, v: &toml::Value) {
    let flag = format!("--{}", key.replace('_', "-"));
    match (v, opt_str(v)) {
        (toml::Value::Boolean(true), _) => args.push(flag),
        (toml::Value::Boolean(false), _) => {}
        (_, Some(s)) => args.push(format!("{flag}={s}")),
        _ => {}
    }
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
            m.keep_macs.as_ref().map(|b| b.get_ref().clone())
        }
        .unwrap_or_default();
        for &b in &budgets {
            for &seed in &r.seeds {
                let label = m.label();
                let id = format!(
                    "{}-{}{}-s{seed}",
                    file_safe(&label),
                    if sparse { "sp" } else { "macs" },
                    b
                );
                let kind = if sparse {
                    StepKind::Sparsify
                } else {
                    StepKind::Prune
                };
                let mut args = vec![kind.command().to_string(), dense.display().to_string()];
                args.extend(data_args(r, o));
                args.extend(["--method".into(), name.clone()]);
                if sparse {
                    args.extend(["--sparsity".into(), b.to_string()]);
                    if let Some(c) = r.data.calib {
                        args.extend(["--calib".into(), c.to_string()]);
                    }
                } else {
                    args.extend(["--keep-macs".into(), b.to_string()]);
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
                    if !k.starts_with("meta-") {
                        push_option(&mut args, k, v);
                    }
                }
                if m.needs_meta_training() {
                    let g = generator_path(o, &label);
                    args.push(format!("--generator={}", g.display()));
                }
                let model = o.out.join("steps").join(format!("{id}.safetensors"));
                args.extend(["--json".into(), "-o".into(), model.display().to_string()]);
                steps.push(Step {
                    id,
                    label,
                    method: name.clone(),
                    kind,
                    budget: b,
                    seed,
                    args,
                });
            }
        }
    }
    steps
}

/// An exclusive lock on a run directory (`OUT/.lock`, Linux `flock`), held by the run and
/// inherited by its step children: a second `lopper run` on the same directory is refused
/// while either the run or any child it started (an orphan of a killed run) is alive.
pub struct RunLock {
    #[allow(dead_code)] // held for its file descriptor
    file: std::fs::File,
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // A run that was just killed takes its children with it, but they need a
            // moment to exit: wait a little before calling the directory busy.
            let t = std::time::Instant::now();
            // SAFETY: flock on a descriptor we own.
            let try_lock =
                || unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            let mut r = try_lock();
            while r != 0 && t.elapsed() < std::time::Duration::from_secs(5) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                r = try_lock();
            }
            if r != 0 {
                let mut who = String::new();
                let _ = file.read_to_string(&mut who);
                bail!(
                    "{} is in use by another lopper run or its step (pid {}); wait for it to finish or stop it",
                    dir.display(),
                    who.trim()
                );
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(RunLock { file })
    }

    #[cfg(unix)]
    fn fd(&self) -> i32 {
        use std::os::unix::io::AsRawFd;
        self.file.as_raw_fd()
    }
}

/// Runs a child lopper and parses its JSON stdout. Its stderr (progress lines, warnings)
/// is forwarded to `progress` line by line as it comes, behind `prefix`, so a long step is
/// visibly advancing. The child dies with this process (Linux `PR_SET_PDEATHSIG`: SIGTERM
/// when the parent dies, also by kill -9), so no step keeps working, unseen, after its run
/// was stopped; it holds the run's lock while alive. (The signal follows the spawning
/// thread: a thread of the worker pool the command runs on, which lives as long as the
/// process.)
fn child<T: for<'de> Deserialize<'de>>(
    o: &RunOpts,
    args: &[String],
    what: &str,
    lock: &RunLock,
    progress: &dyn Progress,
    prefix: &str,
) -> Result<T> {
    let mut cmd = Command::new(&o.exe);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as i32;
        let fd = lock.fd();
        // SAFETY: only async-signal-safe calls (prctl, getppid, fcntl, _exit) between fork
        // and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                // Keep the run's lock open in the child (clear close-on-exec).
                libc::fcntl(fd, libc::F_SETFD, 0);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = lock;
    let mut proc = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", o.exe.display()))?;
    let mut stdout = proc.stdout.take().expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf).map(|_| buf)
    });
    let mut stderr = String::new();
    if let Some(err) = proc.stderr.take() {
        for line in std::io::BufRead::lines(std::io::BufReader::new(err)) {
            let Ok(line) = line else { break };
            progress.line(&format!("{prefix}{line}"));
            stderr.push_str(&line);
            stderr.push('\n');
        }
    }
    let status = proc
        .wait()
        .with_context(|| format!("waiting for {}", o.exe.display()))?;
    let stdout = reader
        .join()
        .map_err(|_| anyhow!("{what}: reading the child's output failed"))?
        .with_context(|| format!("{what}: reading the child's output"))?;
    if !status.success() {
        bail!(
            "{what} failed (lopper {}):\n{}",
            args.join(" "),
            stderr.trim_end()
        );
    }
    serde_json::from_slice(&stdout)
        .with_context(|| format!("{what}: the child printed no JSON report of the expected form"))
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
pub fn run(r: &Recipe, o: &RunOpts, progress: &dyn Progress) -> Result<RunReport> {
    let t0 = Instant::now();
    std::fs::create_dir_all(o.out.join("steps"))
        .with_context(|| format!("cannot create {}", o.out.display()))?;
    crate::util::check_writable(&o.out.join("report.json"), "run output")?;
    let lock = RunLock::acquire(&o.out)?;
    let log = |m: String| progress.line(&m);
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
            let (_, ran): (serde_json::Value, bool) =
                cached(&o.out.join("dense.train.json"), &args, || {
                    log(format!(
                        "training the dense model: lopper {}",
                        args.join(" ")
                    ));
                    child(
                        o,
                        &args,
                        "training the dense model",
                        &lock,
                        progress,
                        "  train: ",
                    )
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
        let mut v: DenseEval = child(
            o,
            &eval_args,
            "evaluating the dense model",
            &lock,
            progress,
            "  eval: ",
        )?;
        let insp = vec!["inspect".to_string(), dense_path.clone(), "--json".into()];
        v.cost = child(
            o,
            &insp,
            "inspecting the dense model",
            &lock,
            progress,
            "  ",
        )
        .ok();
        Ok(v)
    })?;
    // Generators for STAMP methods that were not given one, meta-trained on the dense
    // model and the recipe's data (cached like the steps).
    for (label, out, args) in meta_training(r, Path::new(&dense_path), o) {
        let rec = out.with_extension("json");
        std::fs::create_dir_all(out.parent().unwrap_or(&o.out))
            .with_context(|| format!("cannot create {}", o.out.display()))?;
        let (_, ran): (serde_json::Value, bool) = cached(&rec, &args, || {
            log(format!(
                "meta-training the STAMP generator of '{label}': lopper {}",
                args.join(" ")
            ));
            child(
                o,
                &args,
                &format!("meta-training the generator of '{label}'"),
                &lock,
                progress,
                "  stamp: ",
            )
        })?;
        if !ran && !out.exists() {
            bail!(
                "{}: cached meta-training but the generator is gone; delete {}",
                o.out.display(),
                rec.display()
            );
        }
    }
    let steps = plan(r, Path::new(&dense_path), o);
    let mut results = Vec::new();
    let mut ran = Vec::new();
    let mut ran_seconds = 0.0;
    for (i, s) in steps.iter().enumerate() {
        let path = o.out.join("steps").join(format!("{}.json", s.id));
        let tag = format!("[{}/{}] {}", i + 1, steps.len(), s.id);
        let (res, did) = cached(&path, &s.args, || {
            log(format!("{tag}: lopper {}", s.args.join(" ")));
            let t = Instant::now();
            let report = child(
                o,
                &s.args,
                &format!("step {}", s.id),
                &lock,
                progress,
                &format!("  {tag}: "),
            )?;
            Ok(StepResult {
                step: s.clone(),
                report,
                seconds: t.elapsed().as_secs_f64(),
            })
        })?;
        if did {
            ran.push(s.id.clone());
            ran_seconds += res.seconds;
            // The run's ETA: the steps still to run at the mean time of those run so far
            // (cached steps cost nothing).
            let left = steps.len() - i - 1;
            let eta = ran_seconds / ran.len() as f64 * left as f64;
            log(format!(
                "{tag}: done in {}{}",
                human_secs(res.seconds),
                if left > 0 {
                    format!("; {left} step(s) left, run ETA {}", human_secs(eta))
                } else {
                    String::new()
                }
            ));
        } else {
            log(format!("{tag}: cached"));
        }
        results.push(res);
    }
    let rep = RunReport {
        recipe: r.clone(),
        dense,
        steps: results,
        ran,
        machine: Machine {
            threads: rayon::current_num_threads(),
            cpu: cpu_model(),
            os: std::env::consts::OS.to_string(),
        },
        seconds: t0.elapsed().as_secs_f64(),
    };
    atomic_write(
        &o.out.join("report.json"),
        serde_json::to_string_pretty(&rep)?.as_bytes(),
    )?;
    atomic_write(&o.out.join("report.html"), html::render(&rep)?.as_bytes())?;
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
