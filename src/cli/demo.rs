//! `lopper demo`: the main job on the embedded 8x8 digits, no setup needed. It runs the
//! shipped recipe `recipes/demo-digits.toml` (embedded in the binary): a ResNet-8 trained
//! here, pruned to half its MACs by six structured methods (STAMP with a generator
//! meta-trained here) and sparsified to 90 % by five
//! post-training methods, each fine-tuned briefly, then a table and `report.html`.

use super::*;

/// The demo recipe, as shipped in `recipes/`.
const RECIPE: &str = include_str!("../../recipes/demo-digits.toml");

#[derive(Args)]
pub struct DemoArgs {
    /// Training epochs of the dense ResNet-8.
    #[arg(long, default_value_t = 30, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    epochs: usize,
    /// Output directory (report.html, report.json, the models of every step).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Print the run report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let mut r = lopper::recipe::parse(RECIPE, "the demo recipe")?;
    if let Some(t) = r.model.train.as_mut() {
        t.epochs = a.epochs;
    }
    if !a.json {
        println!(
            "lopper demo: a ResNet-8 on the embedded 8x8 digits ({} epochs), pruned to 50 % of its MACs \
             (l1, taylor, fpgm, i-SpaSP, DWR, STAMP) and sparsified to 90 % (magnitude, global, wanda, POT, UniPTS), \
             each fine-tuned briefly; every number is measured here.\n",
            a.epochs
        );
    }
    let opts = lopper::recipe::run::RunOpts {
        out: a.out.clone(),
        exe: std::env::current_exe()?,
        data_dir: None,
        device: None,
    };
    let rep = lopper::recipe::run::run(&r, &opts, &super::progress::Console::new())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
        return Ok(());
    }
    super::run::print_table(&rep);
    println!(
        "\n{} steps in {:.0}s ({} cached). Report with charts: {}",
        rep.steps.len(),
        rep.seconds,
        rep.steps.len() - rep.ran.len(),
        a.out.join("report.html").display()
    );
    println!(
        "\nNext:\n  lopper prune model.onnx --data path/to/images --method l1 --keep-macs 0.5 -o small.onnx   # your own model\n  \
         lopper run recipes/mlp-mnist.toml                                                               # a bigger comparison (MNIST)\n  \
         lopper prune --help                                                                             # every method and option"
    );
    Ok(())
}
