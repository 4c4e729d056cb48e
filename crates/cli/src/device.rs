//! `--device auto|cpu|cuda[:N]` and `--gpu-expert-cache SIZE`: where a loaded model runs.
//!
//! The CUDA backend is the `cuda` cargo feature (crate `moestream-cuda`). Without it `auto` is
//! the CPU and `cuda` is an error; with it, `auto` takes GPU 0 when libcuda and a device are
//! present and otherwise says it falls back to the CPU.
use anyhow::Result;
use clap::Args;
use moestream_engine::models::Model;

/// The device options of every model-running command.
#[derive(Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// Where the model runs: auto (a CUDA GPU when this build has the `cuda` feature and one is
    /// present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    pub device: DeviceChoice,
    /// VRAM for routed experts on a GPU (e.g. 4G); the rest stay in host memory or on disk and
    /// are copied in on demand. Default: all of them if they fit, else what is free after the
    /// other weights and 2 GiB.
    #[arg(long, value_name = "SIZE", value_parser = crate::loaded::parse_size)]
    pub gpu_expert_cache: Option<u64>,
}

impl DeviceArgs {
    /// Moves `model` to the device these options name (prints the placement on stderr).
    pub fn place(&self, model: &mut Model) -> Result<()> {
        place(model, self.device, self.gpu_expert_cache)
    }
}

/// Where to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A GPU when there is one (and this build has CUDA), else the CPU.
    #[default]
    Auto,
    /// The CPU kernels.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("{s:?} is not a device (auto, cpu, cuda or cuda:N)")),
        }
    }
}

fn place(model: &mut Model, choice: DeviceChoice, gpu_expert_cache: Option<u64>) -> Result<()> {
    match choice {
        DeviceChoice::Cpu => Ok(()),
        DeviceChoice::Auto => auto(model, gpu_expert_cache),
        DeviceChoice::Cuda(n) => cuda(model, n, gpu_expert_cache),
    }
}

#[cfg(feature = "cuda")]
fn auto(model: &mut Model, budget: Option<u64>) -> Result<()> {
    if moestream_cuda::devices() == 0 {
        eprintln!("no CUDA device found (libcuda or a GPU is missing): running on the CPU");
        return Ok(());
    }
    cuda(model, 0, budget)
}

#[cfg(not(feature = "cuda"))]
fn auto(_: &mut Model, _: Option<u64>) -> Result<()> {
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda(model: &mut Model, ordinal: usize, budget: Option<u64>) -> Result<()> {
    let budget = match budget {
        Some(b) => moestream_cuda::ExpertBudget::Bytes(b as usize),
        None => moestream_cuda::ExpertBudget::Auto,
    };
    let line = moestream_cuda::accelerate(model, ordinal, budget)?;
    eprintln!("{line}");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &mut Model, _: usize, _: Option<u64>) -> Result<()> {
    anyhow::bail!(
        "this moestream was built without CUDA: rebuild with `cargo build --release --features cuda`"
    )
}
