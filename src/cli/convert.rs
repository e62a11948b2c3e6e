//! Convert a model between formats: lopper safetensors (.safetensors) and ONNX (.onnx).

use super::*;

#[derive(Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output file; the extension picks the format.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let ConvertArgs { model, output } = a;
    lopper::util::check_model_output(&output)?;
    let g = resolve_model(&model, None, None)?;
    save_model(&g, &output)?;
    eprintln!("wrote {}", output.display());
    Ok(())
}
