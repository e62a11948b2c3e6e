//! Print the per-node table (shape, params, MACs) and totals.

use super::*;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let InspectArgs { model, json: j } = a;
    let g = resolve_model(&model, None, None)?;
    let c = cost::cost(&g)?;
    if j {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", c.table());
    }
    Ok(())
}
