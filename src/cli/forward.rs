//! Run a model (eval mode) on raw little-endian inputs, one file per graph input, each
//! `[B, ...that input's shape]`: f32, except token ids and attention masks (inputs the model
//! reads through an embedding table or as attention's key mask), which are int64 as
//! tokenizers write them (`ids.astype("<i8").tofile(...)`: the tokenizer-free path for
//! BERT-style models). Writes every output as raw f32, one after another in the graph's
//! output order (for comparisons with other runtimes). `--json` says where each output
//! starts.

use super::*;

#[derive(Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Raw input (f32; int64 for token ids and attention masks); repeat it once per graph
    /// input, in the model's input order.
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// Raw f32 output: every graph output, flattened, one after another.
    #[arg(short, long)]
    output: PathBuf,
    /// Print each output's name, shape and offset (in f32 values) as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let ForwardArgs {
        model,
        input,
        output,
        json,
        device,
    } = a;
    let dev = device.open()?;
    lopper::util::check_writable(&output, "output")?;
    let g = on_device(resolve_model(&model, None, None)?, &dev)?;
    let ids = g.input_ids();
    if input.len() != ids.len() {
        let names: Vec<&str> = ids.iter().map(|&i| g.nodes[i].name.as_str()).collect();
        bail!(
            "the model has {} input(s) ({}); give --input once for each, in that order ({} given)",
            ids.len(),
            names.join(", "),
            input.len()
        );
    }
    let shapes = g.shapes()?;
    let xs = input
        .iter()
        .zip(&ids)
        .map(|(path, &id)| {
            let ints = g.token_input(id).is_some();
            read_raw(path, &g.nodes[id].name, &shapes[id], ints)
        })
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&candle_core::Tensor> = xs.iter().collect();
    let plan = lopper::exec::Plan::new(
        &g,
        lopper::exec::Mode::Eval,
        &lopper::exec::PlanOpts::default(),
    )?;
    let ys = plan
        .run_inputs(&g, &refs, &lopper::exec::Feeds::default())?
        .outputs;
    let mut out: Vec<u8> = Vec::new();
    let mut info = Vec::new();
    for (y, &o) in ys.iter().zip(&g.outputs) {
        info.push(serde_json::json!({
            "name": g.nodes[o].name,
            "shape": y.dims(),
            "offset": out.len() / 4,
        }));
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        out.extend(v.iter().flat_map(|f| f.to_le_bytes()));
    }
    lopper::util::atomic_write(&output, &out)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "outputs": info }))?
        );
    }
    Ok(())
}

/// Reads raw samples of `shape` for input `name` (little-endian f32, or int64 when
/// `ints`); the batch is what the file holds.
fn read_raw(path: &Path, name: &str, shape: &[usize], ints: bool) -> Result<candle_core::Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let per: usize = shape.iter().product();
    let (w, kind) = if ints { (8, "int64") } else { (4, "f32") };
    if bytes.len() % w != 0 || bytes.is_empty() || (bytes.len() / w) % per != 0 {
        bail!(
            "{}: {} bytes are not a whole number of {kind} samples of shape {:?} (input '{name}')",
            path.display(),
            bytes.len(),
            shape
        );
    }
    let v: Vec<f32> = if ints {
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect()
    } else {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let mut dims = vec![v.len() / per];
    dims.extend(shape);
    Ok(candle_core::Tensor::from_vec(
        v,
        dims,
        &candle_core::Device::Cpu,
    )?)
}
