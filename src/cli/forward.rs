//! Run a model (eval mode) on raw little-endian f32 inputs `[B, ...input shape]`; writes
//! the first output as raw f32 (for comparisons with other runtimes).

use super::*;

#[derive(Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    input: PathBuf,
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let ForwardArgs {
        model,
        input,
        output,
    } = a;
    lopper::util::check_writable(&output, "output")?;
    let g = resolve_model(&model, None, None)?;
    let bytes = std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
    let per: usize = g.input_shape().iter().product();
    if bytes.len() % 4 != 0 || bytes.is_empty() || (bytes.len() / 4) % per != 0 {
        bail!(
            "{}: {} bytes are not a whole number of f32 samples of shape {:?}",
            input.display(),
            bytes.len(),
            g.input_shape()
        );
    }
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut dims = vec![v.len() / per];
    dims.extend(g.input_shape());
    let x = candle_core::Tensor::from_vec(v, dims, &candle_core::Device::Cpu)?;
    let y = lopper::exec::forward(&g, &x, lopper::exec::Mode::Eval)?;
    let out: Vec<u8> = y
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    lopper::util::atomic_write(&output, &out)
}
