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
    /// Print what was written as JSON (files, sizes, hash, inputs, outputs, cost).
    #[arg(long)]
    json: bool,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let ConvertArgs {
        model,
        output,
        external_data,
        json,
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
    let hash = if onnx {
        lopper::onnx::save_opts(&g, &output, &[], external_data)?
    } else {
        io::save_with(&g, &output, &[])?
    };
    let data = output.with_file_name(format!(
        "{}.data",
        output.file_name().unwrap_or_default().to_string_lossy()
    ));
    let data = (onnx && data.is_file()).then_some(data);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    if json {
        let shapes = g.shapes()?;
        let names = |ids: &[usize]| -> Vec<serde_json::Value> {
            ids.iter()
                .map(|&i| json!({"name": g.nodes[i].name, "shape": shapes[i]}))
                .collect()
        };
        let c = cost::cost(&g)?;
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": model.model,
                "output": output,
                "format": if onnx { "onnx" } else { "lopper-safetensors" },
                "bytes": size(&output),
                "external_data": data.as_ref().map(|d| json!({"file": d, "bytes": size(d)})),
                "fnv64": format!("{hash:016x}"),
                "inputs": names(&g.input_ids()),
                "outputs": names(&g.outputs),
                "params": c.total_params,
                "macs": c.total_macs,
            }))?
        );
    } else {
        eprintln!(
            "wrote {}{}",
            output.display(),
            data.map(|d| format!(" and {}", d.display()))
                .unwrap_or_default()
        );
    }
    Ok(())
}
