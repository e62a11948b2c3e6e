//! Where a model runs: `--device cpu|cuda[:N]`, and a count of device-to-host reads.
//!
//! A graph lives on one candle device (its parameters'); the executor moves inputs there,
//! rewrites keep their source's device, and lopper's custom kernels run only on the CPU
//! (other devices use candle's own ops, cuDNN convolutions with the `cudnn` feature).
//!
//! The read counter exists so that "no host round-trip inside a training step" is
//! checked, not assumed: every place that copies tensor values to the host on purpose
//! goes through [`to_host`] (or calls [`count_host_read`]), and the device-path trainer's
//! test asserts how many reads a run made. On the CPU a read is free; on a GPU each one
//! is a synchronisation.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};

static HOST_READS: AtomicUsize = AtomicUsize::new(0);

/// Parses a `--device` value: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`, and opens it.
/// Errors say what to do: a build without CUDA names the feature; a CUDA build on a
/// machine without a GPU (or without the driver) reports the driver's error.
pub fn open(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("--device '{spec}': expected cpu, cuda or cuda:N (N a GPU index)"),
        },
        None => bail!("--device '{spec}': expected cpu, cuda or cuda:N (N a GPU index)"),
    };
    if !cfg!(feature = "cuda") {
        bail!(
            "--device {spec}: this lopper was built without CUDA support; rebuild with \
             `cargo build --release --features cuda` (README, section GPU)"
        );
    }
    Device::new_cuda(ordinal).map_err(|e| {
        // candle appends a backtrace to driver errors when RUST_BACKTRACE is set: the
        // driver's own words are the first line.
        let e = e.to_string();
        let why = e.lines().next().unwrap_or("").trim();
        anyhow::anyhow!(
            "--device {spec}: CUDA device {ordinal} cannot be opened ({why}); is there an \
             NVIDIA GPU with its driver on this machine? Use --device cpu otherwise"
        )
    })
}

/// A short name for messages and reports: `cpu`, `cuda:0`.
pub fn name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// Notes one deliberate copy of tensor values to the host.
pub fn count_host_read() {
    HOST_READS.fetch_add(1, Ordering::Relaxed);
}

/// Deliberate host reads so far in this process ([`count_host_read`]).
pub fn host_reads() -> usize {
    HOST_READS.load(Ordering::Relaxed)
}

/// All values of `t` as a host vector, counted as one host read.
pub fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    count_host_read();
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// A scalar tensor's value on the host, counted as one host read.
pub fn scalar(t: &Tensor) -> Result<f32> {
    count_host_read();
    Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
}
