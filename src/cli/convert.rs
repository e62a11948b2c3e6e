//! Convert a model between formats: lopper safetensors (.safetensors) and ONNX (.onnx).

use super::*;

#[derive(Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output file; the extension picks the format.
    #[arg(short, long)]
    output: PathBuf,
    /// ONNX only: keep the weights in `OUTPUT.data` beside the model (as PyTorch's default
    /// exporter does; automatic above ONNX's 2 GB limit).
    #[arg(long)]
    external_data: bool,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let ConvertArgs {
        model,
        output,
        external_data,
    } = a;
    lopper::util::check_model_output(&output)?;
    let onnx = output.extension().is_some_and(|e| e == "onnx");
    if external_data && !onnx {
        bail!(
            "--external-data applies to ONNX output; {} is not a .onnx path",
            output.display()
        );
    }
    let g = resolve_model(&model, None, None)?;
    if onnx {
        lopper::onnx::save_opts(&g, &output, &[], external_data)?;
    } else {
        save_model(&g, &output)?;
    }
    eprintln!("wrote {}", output.display());
    Ok(())
}
