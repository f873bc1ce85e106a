//! `--device cpu|cuda[:N]|auto` and `bitnet devices`: which backend a command runs on.
//!
//! A command written once over [`Backend`] implements [`OnBackend`]; [`dispatch`] resolves the
//! flag, opens the GPU when one is asked for (or, for `auto`, when one is usable) and runs the
//! command with a constructor of that backend. Without the `cuda` feature, or without a usable
//! GPU, `auto` runs on the CPU with a note saying why, and `cuda` is a clear error.

use anyhow::{bail, Result};
use bitnet_inference::{Backend, CpuBackend};
use clap::Args;

/// Where to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// GPU `N` (`cuda` is `cuda:0`).
    Cuda(usize),
    /// The first GPU if one is usable, else the CPU.
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "auto" => Ok(Device::Auto),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: expected cpu, cuda, cuda:N or auto")),
            },
        }
    }
}

/// The `--device` flag of the commands that run a model.
#[derive(Args, Clone, Copy, Debug)]
pub struct DeviceArg {
    /// Where the model runs: `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` (a GPU if one is usable,
    /// else the CPU). GPUs need a binary built with `--features cuda`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse()
}

/// A command that runs on whichever backend [`dispatch`] picks.
pub trait OnBackend {
    type Output;
    /// Runs with `make`, which builds handles of one backend (the model's and each context's).
    /// `gpu` is the GPU when the backend is one.
    fn run<B: Backend + 'static>(
        self,
        make: &(dyn Fn() -> B + Sync),
        gpu: Option<&Gpu>,
    ) -> Result<Self::Output>;
}

/// An opened GPU.
pub struct Gpu {
    #[cfg(feature = "cuda")]
    pub device: std::sync::Arc<bitnet_cuda::CudaDevice>,
}

impl Gpu {
    /// Device-to-device copy bandwidth in GB/s (bytes read plus written), the roof of a
    /// memory-bound kernel.
    pub fn bandwidth_gbs(&self) -> Result<f64> {
        #[cfg(feature = "cuda")]
        return Ok(bitnet_cuda::device::copy_bandwidth_gbs(&self.device)?);
        #[cfg(not(feature = "cuda"))]
        bail!("built without CUDA")
    }
}

/// Resolves `device` and runs `job` on it.
pub fn dispatch<T: OnBackend>(device: Device, job: T) -> Result<T::Output> {
    match open_gpu(device)? {
        None => job.run(&CpuBackend::new, None),
        #[cfg(feature = "cuda")]
        Some(gpu) => {
            let dev = gpu.device.clone();
            job.run(&move || bitnet_cuda::CudaBackend::on(dev.clone()), Some(&gpu))
        }
        #[cfg(not(feature = "cuda"))]
        Some(_) => unreachable!("no GPU opens without the cuda feature"),
    }
}

/// The GPU `device` names, or `None` for the CPU.
fn open_gpu(device: Device) -> Result<Option<Gpu>> {
    let ordinal = match device {
        Device::Cpu => return Ok(None),
        Device::Cuda(n) => n,
        Device::Auto => 0,
    };
    #[cfg(feature = "cuda")]
    match bitnet_cuda::CudaDevice::open(ordinal) {
        Ok(device) => Ok(Some(Gpu { device })),
        Err(e) if device == Device::Auto => {
            eprintln!("note: no usable GPU ({e}); running on the CPU");
            Ok(None)
        }
        Err(e) => bail!("--device cuda:{ordinal}: {e}"),
    }
    #[cfg(not(feature = "cuda"))]
    {
        let why = "this bitnet was built without CUDA support (rebuild with `cargo build --release --features cuda`)";
        if device == Device::Auto {
            eprintln!("note: {why}; running on the CPU");
            return Ok(None);
        }
        bail!("--device cuda:{ordinal}: {why}")
    }
}

/// `bitnet devices`: the CPU's features and every GPU.
pub fn devices() -> Result<()> {
    let cpu = bitnet_core::cpu::CpuFeatures::detect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("cpu: {} threads, features: {}", threads, cpu.names().join(" "));
    #[cfg(feature = "cuda")]
    {
        match bitnet_cuda::driver_version() {
            Err(e) => println!("gpu: none ({e})"),
            Ok((major, minor)) => match bitnet_cuda::list_devices() {
                Err(e) => println!("gpu: none (driver CUDA {major}.{minor}: {e})"),
                Ok(gpus) if gpus.is_empty() => {
                    println!("gpu: none (driver CUDA {major}.{minor} sees no device)")
                }
                Ok(gpus) => {
                    for g in gpus {
                        println!(
                            "cuda:{}: {}, {:.1} GiB, compute capability {}.{}, {} SMs, {:.0} GB/s peak memory bandwidth, driver CUDA {major}.{minor}",
                            g.ordinal,
                            g.name,
                            g.memory_bytes as f64 / (1u64 << 30) as f64,
                            g.compute_capability.0,
                            g.compute_capability.1,
                            g.multiprocessors,
                            g.peak_bandwidth_gbs()
                        );
                    }
                    if !bitnet_cuda::device::nvrtc_present() {
                        println!("note: NVRTC (libnvrtc.so) does not load, so the kernels cannot be compiled: install the CUDA toolkit or add its lib64 folder to LD_LIBRARY_PATH");
                    }
                }
            },
        }
    }
    #[cfg(not(feature = "cuda"))]
    println!(
        "gpu: none (this bitnet was built without CUDA support: `cargo build --release --features cuda`)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert_eq!("auto".parse(), Ok(Device::Auto));
        assert!("cuda:x".parse::<Device>().unwrap_err().contains("cuda:N"));
        assert!("tpu".parse::<Device>().is_err());
    }

    /// Without a GPU, `auto` runs on the CPU and `cuda` is an error that says why; never a crash.
    #[test]
    fn auto_falls_back_to_the_cpu_and_cuda_says_why() {
        struct Name;
        impl OnBackend for Name {
            type Output = String;
            fn run<B: Backend + 'static>(
                self,
                make: &(dyn Fn() -> B + Sync),
                _: Option<&Gpu>,
            ) -> Result<String> {
                Ok(make().name())
            }
        }
        assert!(dispatch(Device::Cpu, Name).unwrap().starts_with("cpu"));
        let auto = dispatch(Device::Auto, Name).unwrap();
        let cuda = dispatch(Device::Cuda(0), Name);
        if auto.starts_with("cpu") {
            let e = cuda.unwrap_err().to_string();
            assert!(e.contains("--device cuda:0"), "{e}");
        }
        assert!(dispatch(Device::Cuda(99), Name).is_err());
    }
}
