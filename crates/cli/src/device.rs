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
    /// Which VRAM expert slot a miss replaces: lru (least recently used) or lfu (least used,
    /// counts halved every 4,096 lookups).
    #[arg(long, default_value = "lru", value_name = "lru|lfu")]
    pub gpu_expert_eviction: moestream_engine::store::Eviction,
}

impl DeviceArgs {
    /// Moves `model` to the device these options name (prints the placement on stderr).
    pub fn place(&self, model: &mut Model) -> Result<()> {
        match self.device {
            DeviceChoice::Cpu => Ok(()),
            DeviceChoice::Auto => auto(model, self),
            DeviceChoice::Cuda(n) => cuda(model, n, self),
        }
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

#[cfg(feature = "cuda")]
fn auto(model: &mut Model, args: &DeviceArgs) -> Result<()> {
    if moestream_cuda::devices() == 0 {
        eprintln!("no CUDA device found (libcuda or a GPU is missing): running on the CPU");
        return Ok(());
    }
    cuda(model, 0, args)
}

#[cfg(not(feature = "cuda"))]
fn auto(_: &mut Model, _: &DeviceArgs) -> Result<()> {
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda(model: &mut Model, ordinal: usize, args: &DeviceArgs) -> Result<()> {
    let budget = match args.gpu_expert_cache {
        Some(b) => moestream_cuda::ExpertBudget::Bytes(b as usize),
        None => moestream_cuda::ExpertBudget::Auto,
    };
    let line = moestream_cuda::accelerate(model, ordinal, budget, args.gpu_expert_eviction)?;
    eprintln!("{line}");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &mut Model, _: usize, _: &DeviceArgs) -> Result<()> {
    anyhow::bail!(
        "this moestream was built without CUDA: rebuild with `cargo build --release --features cuda`"
    )
}
