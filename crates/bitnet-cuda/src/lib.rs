//! The BitNet b1.58 forward pass on NVIDIA GPUs: [`CudaBackend`], a
//! [`bitnet_inference::Backend`] on [cudarc](https://docs.rs/cudarc) with the driver and NVRTC
//! loaded at run time, so that this crate builds and links on machines without CUDA.
//!
//! The kernels live in `src/kernels/*.cu` and are compiled by NVRTC for the device when it is
//! opened, with `--fmad=false` so that their float arithmetic rounds as the CPU reference's
//! does. Each kernel names the CPU operation it must equal; `tests/conformance.rs` runs
//! [`bitnet_inference::conformance::check_backend`] on the GPU (and says SKIPPED without one).
//! Weights arrive layout-neutral ([`bitnet_quant::TernaryMatrix::to_codes`]) and are packed by
//! [`layout`] for the dp4a kernels. See docs/cuda.md.

pub mod backend;
pub mod device;
pub mod layout;

pub use backend::{compile_kernels, CudaBackend, CudaDevice};
pub use device::{device_count, driver_version, list_devices, CudaError, GpuInfo};
