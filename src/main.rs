//! The `lopper` command line: parsing and dispatch (the subcommands live in `cli/`).
//! Every failure prints one clear error line and exits 1.

use clap::{Parser, Subcommand};

mod cli;

/// Activation buffers start on cache lines (`lopper::util::aligned`).
#[global_allocator]
static ALLOC: lopper::util::aligned::CacheAligned = lopper::util::aligned::CacheAligned;

#[derive(Parser)]
#[command(
    name = "lopper",
    version,
    about = "Prune trained neural networks and measure accuracy, MACs and latency"
)]
struct Cli {
    /// No progress on stderr (results and errors still print).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole job on the embedded 8x8 digits (~20 s): train a ResNet-8, prune it with
    /// every structured method to 50 % MACs and sparsify it to 90 %, print the table.
    Demo(cli::demo::DemoArgs),
    /// Train a model (zoo name or saved model) on a dataset.
    Train(Box<cli::training::TrainArgs>),
    /// Evaluate a model on a dataset's test split.
    Eval(cli::eval::EvalArgs),
    /// Print the per-node table (shape, params, MACs) and totals.
    Inspect(cli::inspect::InspectArgs),
    /// Run a model (eval mode) on raw little-endian f32 inputs `[B, ...input shape]`; writes
    /// the first output as raw f32 (for comparisons with other runtimes).
    Forward(cli::forward::ForwardArgs),
    /// Convert a model between formats: lopper safetensors (.safetensors) and ONNX (.onnx).
    Convert(cli::convert::ConvertArgs),
    /// Structured pruning: remove channels by a criterion under a budget, fine-tune, report.
    Prune(Box<cli::prune::PruneArgs>),
    /// Post-training sparsity from a small calibration set: magnitude, global, wanda, pot,
    /// unipts (unstructured or N:M); saves the model with compressed sparse weights.
    Sparsify(Box<cli::sparsify::SparsifyArgs>),
    /// STAMP: meta-train the set encoder and mask generator on a reference dataset.
    Stamp(cli::stamp::StampArgs),
    /// Run a TOML recipe (data, dense model, methods × budgets × seeds), resuming from
    /// finished steps; writes report.json and a self-contained report.html.
    Run(cli::run::RunArgs),
    /// Prune each dependency group alone at several ratios; table + SVG chart.
    Sensitivity(Box<cli::sensitivity::SensitivityArgs>),
    /// Time the reference workloads (median of N steps after warm-up, peak RSS).
    Bench(cli::bench::BenchArgs),
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Demo(a) => cli::demo::run(a),
        Cmd::Train(a) => cli::training::run(*a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Inspect(a) => cli::inspect::run(a),
        Cmd::Forward(a) => cli::forward::run(a),
        Cmd::Convert(a) => cli::convert::run(a),
        Cmd::Prune(a) => cli::prune::cmd_prune(*a),
        Cmd::Sparsify(a) => cli::sparsify::cmd_sparsify(*a),
        Cmd::Stamp(a) => cli::stamp::run(a),
        Cmd::Run(a) => cli::run::run(a),
        Cmd::Sensitivity(a) => cli::sensitivity::run(*a),
        Cmd::Bench(a) => cli::bench::run(a),
    }
}

fn main() {
    lopper::util::aligned::read_env();
    // Output piped into `head` (or a closed stderr) ends the process quietly, as for any
    // Unix tool, instead of a panic and exit code 101 from the failed write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    lopper::util::tune_runtime();
    let cli = Cli::parse();
    // `LOPPER_PARSE_ONLY=1`: check the arguments and stop (the README test runs every
    // documented command this way, so a renamed flag breaks the build, not the reader).
    if std::env::var_os("LOPPER_PARSE_ONLY").is_some() {
        return;
    }
    cli::progress::set_quiet(cli.quiet);
    let cmd = cli.cmd;
    let result = if std::env::var("LOPPER_ON_POOL").is_ok_and(|v| v == "0") {
        run(cmd)
    } else {
        lopper::util::on_pool(move || run(cmd))
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
