//! Finding GPUs: whether the driver and NVRTC libraries load, how many devices there are and
//! what each is. Nothing here panics when CUDA is absent: every failure is a [`CudaError`]
//! that says what is missing.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, DriverError};

/// Why a GPU cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no NVIDIA driver: the CUDA driver library (libcuda.so) could not be loaded")]
    NoDriver,
    #[error("no NVRTC: the CUDA runtime compiler library (libnvrtc.so) could not be loaded; install the CUDA toolkit or add its lib64 folder to LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("no GPU {ordinal}: the driver sees {count} device(s)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("{name} has compute capability {major}.{minor}; the kernels need 6.1 or newer (dp4a)")]
    Unsupported { name: String, major: i32, minor: i32 },
    #[error("the CUDA driver: {0}")]
    Driver(String),
    #[error("compiling the kernels with NVRTC: {0}")]
    Compile(String),
}

impl CudaError {
    pub(crate) fn driver(e: DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }

    /// Whether the error says this machine has no usable GPU (no driver, no NVRTC, no such
    /// device, too old a chip), as opposed to a fault of ours: a kernel that does not compile or
    /// a driver call that fails on a present device. GPU tests skip on the first kind only.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            CudaError::NoDriver
                | CudaError::NoNvrtc
                | CudaError::NoDevice { .. }
                | CudaError::Unsupported { .. }
        )
    }
}

/// Whether the driver library loads (no device is touched).
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library by its usual names.
    unsafe { sys::is_culib_present() }
}

/// Whether NVRTC loads.
pub fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The driver's CUDA version as (major, minor), e.g. (13, 0).
pub fn driver_version() -> Result<(i32, i32), CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    cudarc::driver::result::init().map_err(CudaError::driver)?;
    let mut v = 0;
    // SAFETY: the library is loaded and initialized; `v` is a valid out-pointer.
    unsafe { sys::cuDriverGetVersion(&mut v) }.result().map_err(CudaError::driver)?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// Number of CUDA devices (0 when the driver loads but sees none).
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
        Err(e) => Err(CudaError::driver(e)),
    }
}

/// What `bitnet devices` prints of one GPU.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: usize,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    /// Memory clock (kHz) and bus width (bits): 2 × clock × width / 8 is the datasheet bandwidth.
    pub memory_clock_khz: i32,
    pub memory_bus_bits: i32,
}

impl GpuInfo {
    /// The datasheet memory bandwidth in GB/s (double data rate).
    pub fn peak_bandwidth_gbs(&self) -> f64 {
        2.0 * self.memory_clock_khz as f64 * 1e3 * self.memory_bus_bits as f64 / 8.0 / 1e9
    }
}

/// Every GPU the driver sees.
pub fn list_devices() -> Result<Vec<GpuInfo>, CudaError> {
    let n = device_count()?;
    (0..n).map(gpu_info).collect()
}

fn gpu_info(ordinal: usize) -> Result<GpuInfo, CudaError> {
    use sys::CUdevice_attribute as A;
    let dev = cudarc::driver::result::device::get(ordinal as i32).map_err(CudaError::driver)?;
    let name = cudarc::driver::result::device::get_name(dev).map_err(CudaError::driver)?;
    // SAFETY: `dev` is a device handle the driver just returned.
    let attr =
        |a| unsafe { cudarc::driver::result::device::get_attribute(dev, a) }.map_err(CudaError::driver);
    Ok(GpuInfo {
        ordinal,
        name,
        // SAFETY: as above.
        memory_bytes: unsafe { cudarc::driver::result::device::total_mem(dev) }.map_err(CudaError::driver)?,
        compute_capability: (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        memory_clock_khz: attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?,
        memory_bus_bits: attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?,
    })
}

/// A context on GPU `ordinal`, after checking that the libraries load and the device exists.
pub(crate) fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let count = device_count()?;
    if ordinal >= count {
        return Err(CudaError::NoDevice { ordinal, count });
    }
    let ctx = CudaContext::new(ordinal).map_err(CudaError::driver)?;
    // One stream per device: ordering comes from the stream, so per-buffer events are not
    // needed. SAFETY: every allocation of this context is used on that one stream.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// [`crate::CudaDevice::copy_bandwidth_gbs`].
pub fn copy_bandwidth_gbs(dev: &crate::CudaDevice) -> Result<f64, CudaError> {
    dev.copy_bandwidth_gbs()
}
