//! [`CudaBackend`]: the [`Backend`] operations as kernel launches on one CUDA stream.
//!
//! Every handle of a device shares its context, stream and compiled kernels
//! ([`CudaBackend::try_clone`]), so work queued by the model's uploads and by a context's
//! forward steps runs in order. Launches are asynchronous; the first failure is kept and
//! reported by the next [`Backend::synchronize`] or read-back. The per-call metadata (token
//! ids, positions, cache slots, block tables, attention tasks) is copied to the device only
//! when it differs from the previous call's: the layers of one forward step share one copy.

use std::sync::Arc;

use bitnet_core::dense::{DenseData, DenseMatrix};
use bitnet_inference::backend::{AttentionSegment, Backend, BackendError, HeadShape};
use bitnet_inference::KvType;
use bitnet_models::Activation;
use bitnet_quant::{DenseLinear, Int8Matrix, TernaryMatrix, WeightScale};
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError};

use crate::device::{open_context, CudaError};
use crate::layout::{pack_ternary, pad_int8_rows, padded_cols};

/// Keys per cache block (bitnet_inference::BLOCK_TOKENS, which the kernels assume).
const BLOCK_TOKENS: usize = bitnet_inference::BLOCK_TOKENS;
/// Warps and rows of one attention task, and the row strides of its staged key/value chunks
/// and probabilities (attention.cu's ATT_WARPS, ATT_ROWS, ATT_KS, ATT_PS).
const ATT_WARPS: usize = 4;
const ATT_ROWS: usize = 32;
const ATT_KS: usize = 36;
const ATT_PS: usize = 40;
/// Warps of a row attention block (attention.cu's ROW_WARPS).
const ROW_WARPS: usize = 4;
/// Batches up to this many tokens take the GEMV kernel; larger ones the tiled GEMM.
const GEMV_MAX_TOKENS: usize = 8;
/// Batches of at least this many tokens take the bf16 head's tensor-core kernel.
const HEAD_MMA_MIN_TOKENS: usize = 2;
/// Batches up to this many tokens take the tensor-core GEMM's 32 x 32 tiles, larger ones its
/// 64 x 64 tiles (the conformance suite's batches of up to 40 rows reach both).
const MMA_SMALL_MAX_TOKENS: usize = 32;

/// The kernel sources, in the order they are compiled as one program.
const SOURCES: [&str; 5] = [
    include_str!("kernels/common.cuh"),
    include_str!("kernels/rows.cu"),
    include_str!("kernels/ternary.cu"),
    include_str!("kernels/attention.cu"),
    include_str!("kernels/lm_head.cu"),
];

/// Head sizes the attention kernels are built for, as 32-lane chunks (`ceil(head_dim / 32)`).
const ATTENTION_CHUNKS: [usize; 5] = [1, 2, 3, 4, 8];
/// Where the row attention kernels start, counted from `K::Attention`.
const ROW_ATTENTION: usize = 3 * ATTENTION_CHUNKS.len();
/// Segments of up to this many rows (decode steps, short chunks) take the row attention
/// kernels, split over the context; longer ones the tiled kernels.
const ROW_ATTENTION_MAX_ROWS: usize = 4;

/// The kernels by [`K`]: the named ones in [`KERNEL_NAMES`] order, then the attention kernels
/// `[chunks index][kv type]` from `K::Attention`, then the row attention kernels likewise from
/// `K::Attention + ROW_ATTENTION`.
#[derive(Clone, Copy, Debug)]
#[repr(u16)]
enum K {
    Embedding,
    GatherRows,
    Rmsnorm,
    Quantize,
    NormQuantize,
    GateQuantize,
    Gate,
    Add,
    Scale,
    TernaryGemv,
    TernaryGemm,
    TernaryMma,
    TernaryMmaSmall,
    TernaryBlockScaled,
    Int8Gemv,
    Rope,
    RopeKvStore,
    LmHead,
    HeadSplit,
    LmHeadMma,
    AttentionMerge,
    ArgmaxRows,
    Attention,
}

const KERNEL_NAMES: [&str; K::Attention as usize] = [
    "embedding",
    "gather_rows",
    "rmsnorm",
    "quantize",
    "norm_quantize",
    "gate_quantize",
    "gate",
    "add",
    "scale",
    "ternary_gemv",
    "ternary_gemm",
    "ternary_mma",
    "ternary_mma_small",
    "ternary_block_scaled",
    "int8_gemv",
    "rope",
    "rope_kv_store",
    "lm_head",
    "head_split",
    "lm_head_mma",
    "attention_merge",
    "argmax_rows",
];

/// The compiled kernels: the module loaded through the driver API directly, because
/// programmatic dependent launches (`cuLaunchKernelEx` with a launch attribute) need the raw
/// function handles, which cudarc's `CudaFunction` keeps private.
struct Kernels {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    functions: Vec<sys::CUfunction>,
}

// SAFETY: module and function handles are plain driver handles, valid in any thread that binds
// their context (every use below does).
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>, ptx: String) -> Result<Self, CudaError> {
        ctx.bind_to_thread().map_err(CudaError::driver)?;
        let image =
            std::ffi::CString::new(ptx).map_err(|_| CudaError::Compile("the PTX holds a NUL byte".into()))?;
        // SAFETY: `image` is a NUL-terminated PTX text; the context is bound to this thread.
        let module = unsafe { cudarc::driver::result::module::load_data(image.as_ptr() as *const _) }
            .map_err(CudaError::driver)?;
        Ok(Self { ctx: ctx.clone(), module, functions: Vec::new() })
    }

    /// Appends the kernel `name`, returning its handle.
    fn add(&mut self, name: &str) -> Result<sys::CUfunction, CudaError> {
        let c =
            std::ffi::CString::new(name).map_err(|_| CudaError::Compile(format!("kernel name {name:?}")))?;
        // SAFETY: the module is loaded and its context bound (Kernels::load).
        let f = unsafe { cudarc::driver::result::module::get_function(self.module, c) }
            .map_err(CudaError::driver)?;
        self.functions.push(f);
        Ok(f)
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        // Work still queued (a dropped backend flushes its launches) finishes first.
        if self.ctx.bind_to_thread().is_ok() && self.ctx.synchronize().is_ok() {
            // SAFETY: loaded by Kernels::load and unloaded once, after the context's work has
            // finished; no launch follows (every backend handle holds the Arc<CudaDevice> that
            // owns this).
            let _ = unsafe { cudarc::driver::result::module::unload(self.module) };
        }
    }
}

/// One GPU: its context, the stream every handle queues on, the compiled kernels.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    /// Programmatic dependent launches (compute capability 9.0+): each kernel may be
    /// scheduled while the one before it runs (every kernel waits for it first: pdl_enter).
    /// Cleared for good if the driver refuses a launch with the attribute.
    programmatic_launch: std::sync::atomic::AtomicBool,
    /// Int8 tensor cores (mma.sync, compute capability 8.0+) for prefill products.
    tensor_cores: bool,
    name: String,
    ordinal: usize,
    /// Streaming multiprocessors: how many blocks a launch needs to fill the chip.
    multiprocessors: usize,
}

impl CudaDevice {
    /// Opens GPU `ordinal` and compiles the kernels for it (NVRTC, once per process and device).
    pub fn open(ordinal: usize) -> Result<Arc<Self>, CudaError> {
        let ctx = open_context(ordinal)?;
        let name = ctx.name().map_err(CudaError::driver)?;
        let (major, minor) = ctx.compute_capability().map_err(CudaError::driver)?;
        if (major, minor) < (6, 1) {
            return Err(CudaError::Unsupported { name, major, minor });
        }
        let ptx = compile_kernels(major, minor)?;
        let mut kernels = Kernels::load(&ctx, ptx)?;
        for name in KERNEL_NAMES {
            kernels.add(name)?;
        }
        for d in ATTENTION_CHUNKS {
            for kv in ["f32", "bf16", "f16"] {
                kernels.add(&format!("attention_d{d}_{kv}"))?;
            }
        }
        for d in ATTENTION_CHUNKS {
            for kv in ["f32", "bf16", "f16"] {
                kernels.add(&format!("attention_rows_d{d}_{kv}"))?;
            }
        }
        let multiprocessors = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(CudaError::driver)?
            .max(1) as usize;
        let stream = ctx.new_stream().map_err(CudaError::driver)?;
        Ok(Arc::new(Self {
            ctx,
            stream,
            kernels,
            programmatic_launch: std::sync::atomic::AtomicBool::new(major >= 9),
            tensor_cores: major >= 8,
            name,
            ordinal,
            multiprocessors,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Device-memory bandwidth in GB/s: the fastest of ten device-to-device copies of 1 GiB
    /// (bytes read plus bytes written over the time between two events), the roof that a
    /// memory-bound kernel can approach.
    pub fn copy_bandwidth_gbs(&self) -> Result<f64, CudaError> {
        const BYTES: usize = 1 << 30;
        let s = &self.stream;
        let src = s.alloc_zeros::<u8>(BYTES).map_err(CudaError::driver)?;
        let mut dst = s.alloc_zeros::<u8>(BYTES).map_err(CudaError::driver)?;
        let (start, end) = (
            self.ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(CudaError::driver)?,
            self.ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(CudaError::driver)?,
        );
        let mut best = 0.0f64;
        for _ in 0..10 {
            start.record(s).map_err(CudaError::driver)?;
            s.memcpy_dtod(&src, &mut dst).map_err(CudaError::driver)?;
            end.record(s).map_err(CudaError::driver)?;
            end.synchronize().map_err(CudaError::driver)?;
            let ms = start.elapsed_ms(&end).map_err(CudaError::driver)? as f64;
            best = best.max(2.0 * BYTES as f64 / (ms * 1e-3) / 1e9);
        }
        Ok(best)
    }
}

/// The kernels compiled by NVRTC to PTX for compute capability `major.minor` (needs only
/// the NVRTC library, no GPU).
pub fn compile_kernels(major: i32, minor: i32) -> Result<String, CudaError> {
    if !crate::device::nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        fmad: Some(false),
        options: vec![format!("--gpu-architecture=compute_{major}{minor}"), "--std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCES.concat(), opts)
        .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
    Ok(ptx.to_src())
}

/// Shared memory of an attention task of the kernel for heads of `chunks` 32-dim chunks: the
/// scaled queries (rows padded by 4), the probabilities of one key block and two staged
/// 32-key × 32-dim chunks of keys or values.
const fn attention_smem(chunks: usize) -> usize {
    4 * (ATT_ROWS * (chunks * 32 + 4) + ATT_ROWS * ATT_PS + 2 * 32 * ATT_KS)
}

// Every attention kernel fits the default 48 KiB of dynamic shared memory (heads of 256: 47 616
// bytes), so none needs an opt-in.
const _: () = assert!(attention_smem(ATTENTION_CHUNKS[ATTENTION_CHUNKS.len() - 1]) <= 48 << 10);

/// A kernel argument (each is passed by pointer to a value that lives until the launch).
#[derive(Clone, Copy, Debug)]
enum Arg {
    U64(u64),
    I32(i32),
    F32(f32),
}

impl PartialEq for Arg {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Arg::U64(a), Arg::U64(b)) => a == b,
            (Arg::I32(a), Arg::I32(b)) => a == b,
            (Arg::F32(a), Arg::F32(b)) => a.to_bits() == b.to_bits(),
            _ => false,
        }
    }
}

/// One kernel launch, queued until the next flush.
#[derive(Clone, Debug, PartialEq)]
struct Launch {
    kernel: u16,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: Vec<Arg>,
}

/// A captured sequence of launches and its executable graph.
struct Graph {
    launches: Vec<Launch>,
    exec: cudarc::driver::CudaGraph,
}

// SAFETY: a graph is launched only through the `&mut CudaBackend` that owns it, one thread at
// a time; the CUDA driver's graph objects may be used from any thread.
unsafe impl Send for Graph {}

/// Sequences shorter than this run launch by launch.
const GRAPH_MIN_LAUNCHES: usize = 8;
/// Graphs kept per handle (decode steps of a few batch shapes).
const GRAPHS_KEPT: usize = 8;

impl From<u64> for Arg {
    fn from(v: u64) -> Self {
        Arg::U64(v)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::I32(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Self {
        Arg::F32(v)
    }
}

/// A device allocation and its address.
pub struct DeviceVec<T> {
    data: CudaSlice<T>,
    ptr: u64,
}

impl<T: DeviceRepr> DeviceVec<T> {
    fn new(data: CudaSlice<T>, stream: &CudaStream) -> Self {
        let ptr = data.device_ptr(stream).0;
        Self { data, ptr }
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }
}

/// A ternary matrix in the device layout ([`crate::layout`]).
pub struct CudaLinear {
    words: DeviceVec<u32>,
    rows: usize,
    cols: usize,
    /// 0: multiply by `scale`; 1: divide by it (`WeightScale`).
    mode: i32,
    scale: f32,
    block_scales: Option<DeviceVec<f32>>,
}

/// A float matrix in its stored element type.
pub enum DenseStore {
    F32(DeviceVec<f32>),
    Half(DeviceVec<u16>),
}

pub struct CudaDense {
    data: DenseStore,
    /// DT_F32, DT_BF16 or DT_F16.
    dtype: i32,
    rows: usize,
    cols: usize,
}

impl CudaDense {
    fn ptr(&self) -> u64 {
        match &self.data {
            DenseStore::F32(v) => v.ptr,
            DenseStore::Half(v) => v.ptr,
        }
    }
}

/// Int8 weights (8- or 6-bit values) in zero-padded rows with one scale per row.
pub struct CudaInt8 {
    weights: DeviceVec<i8>,
    scales: DeviceVec<f32>,
    rows: usize,
    cols: usize,
}

pub struct CudaVector {
    data: DeviceVec<f32>,
}

pub struct CudaBuffer {
    data: DeviceVec<f32>,
}

/// Int8 activations of up to `capacity` tokens of `width`, rows of `stride` bytes.
pub struct CudaQuant {
    q: DeviceVec<i8>,
    scales: DeviceVec<f32>,
    sums: DeviceVec<i32>,
    width: usize,
    stride: usize,
    capacity: usize,
    /// Tokens the last quantization wrote.
    rows: usize,
}

/// Keys and values of every layer, `[layers, slots, kv_dim]` in the cache's element type.
pub struct CudaKvStore {
    keys: DeviceVec<u8>,
    values: DeviceVec<u8>,
    layers: usize,
    slots: usize,
    kv_dim: usize,
    kv_type: KvType,
}

impl CudaKvStore {
    fn elem_bytes(&self) -> usize {
        self.kv_type.bytes()
    }
    /// Byte offset of `layer`'s data.
    fn layer_offset(&self, layer: usize) -> u64 {
        (layer * self.slots * self.kv_dim * self.elem_bytes()) as u64
    }
}

/// Element types of dense tables and of the KV cache (common.cuh's DT_*).
const DT_F32: i32 = 0;
const DT_BF16: i32 = 1;
const DT_F16: i32 = 2;

fn dtype_code(kv: KvType) -> i32 {
    match kv {
        KvType::F32 => DT_F32,
        KvType::Bf16 => DT_BF16,
        KvType::F16 => DT_F16,
    }
}

/// Metadata of one kind, kept on the device until a call brings different values.
struct Staged<T> {
    host: Vec<T>,
    dev: Option<DeviceVec<T>>,
}

impl<T: PartialEq> Staged<T> {
    /// The device address when the device already holds exactly `data`.
    fn current(&self, data: &[T]) -> Option<u64> {
        self.dev.as_ref().filter(|_| self.host == data).map(|d| d.ptr)
    }
}

impl<T> Default for Staged<T> {
    fn default() -> Self {
        Self { host: Vec::new(), dev: None }
    }
}

#[derive(Default)]
struct Staging {
    ids: Staged<u32>,
    rows: Staged<u32>,
    positions: Staged<u32>,
    slots: Staged<u32>,
    tables: Staged<u32>,
    /// `[first_row, rows, pos0, table_start]` per segment.
    segments: Staged<i32>,
    /// `[segment, t0, t1, head0]` per attention task.
    tasks: Staged<i32>,
    /// `[segment, row]` per row attention task.
    row_tasks: Staged<i32>,
}

/// The CUDA backend: a handle to a [`CudaDevice`].
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    /// Launches queued since the last flush (a read-back, a synchronize, a transfer or new
    /// metadata). A sequence flushed twice in a row is captured as a CUDA graph and replayed
    /// from then on: a decode step's hundreds of launches become one.
    pending: Vec<Launch>,
    last_flushed: Vec<Launch>,
    graphs: Vec<Graph>,
    use_graphs: bool,
    use_tensor_cores: bool,
    use_programmatic_launch: bool,
    /// The first failure since the last synchronize.
    error: Option<BackendError>,
    staging: Staging,
    /// Host scratch for the attention tasks and segments of a call.
    task_host: Vec<i32>,
    row_task_host: Vec<i32>,
    segment_host: Vec<i32>,
    /// The row attention kernels' partial results when they split the context.
    attention_parts: Option<DeviceVec<f32>>,
    /// lm_head_mma's activations as three bf16 planes.
    head_planes: Option<DeviceVec<u16>>,
    /// Split-K `ternary_mma`: the i32 sums of a launch's outputs and a counter per tile, both
    /// zero between launches (the kernel leaves them so).
    mma_part: Option<DeviceVec<i32>>,
    mma_done: Option<DeviceVec<i32>>,
    /// `argmax_rows`' ids on their way to the host.
    argmax_ids: Option<DeviceVec<u32>>,
}

impl CudaBackend {
    /// A backend on GPU `ordinal`, compiling the kernels.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Ok(Self::on(CudaDevice::open(ordinal)?))
    }

    /// Another handle to an opened device (same stream and kernels).
    pub fn on(dev: Arc<CudaDevice>) -> Self {
        Self {
            dev,
            pending: Vec::new(),
            last_flushed: Vec::new(),
            graphs: Vec::new(),
            use_graphs: true,
            use_tensor_cores: true,
            use_programmatic_launch: true,
            error: None,
            staging: Staging::default(),
            task_host: Vec::new(),
            row_task_host: Vec::new(),
            segment_host: Vec::new(),
            attention_parts: None,
            head_planes: None,
            mma_part: None,
            mma_done: None,
            argmax_ids: None,
        }
    }

    /// Another handle to the same device, for a [`bitnet_inference::Context`] of a model
    /// uploaded through this one.
    pub fn try_clone(&self) -> Self {
        Self::on(self.dev.clone())
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    fn err(&self, e: DriverError, what: &'static str, bytes: usize) -> BackendError {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            BackendError::OutOfMemory { device: self.name(), what, bytes }
        } else {
            BackendError::Device { device: self.name(), message: format!("{what}: {e}") }
        }
    }

    fn shape(&self, message: String) -> BackendError {
        BackendError::Shape { device: self.name(), message }
    }

    /// Keeps the first failure of an operation that cannot return one.
    fn note(&mut self, r: Result<(), BackendError>) {
        if let (Err(e), None) = (r, &self.error) {
            self.error = Some(e);
        }
    }

    fn alloc<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
        what: &'static str,
    ) -> Result<DeviceVec<T>, BackendError> {
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        let data = self.dev.stream.alloc_zeros::<T>(len.max(1)).map_err(|e| self.err(e, what, bytes))?;
        Ok(DeviceVec::new(data, &self.dev.stream))
    }

    fn upload<T: DeviceRepr>(&self, host: &[T], what: &'static str) -> Result<DeviceVec<T>, BackendError> {
        let bytes = std::mem::size_of_val(host);
        let data = if host.is_empty() {
            return Err(self.shape(format!("{what}: nothing to upload")));
        } else {
            self.dev.stream.clone_htod(host).map_err(|e| self.err(e, what, bytes))?
        };
        Ok(DeviceVec::new(data, &self.dev.stream))
    }

    /// Launches one after another, each graph only its own copy: with `false`, every
    /// sequence runs launch by launch (for comparing the two).
    pub fn set_graphs(&mut self, on: bool) {
        self.use_graphs = on;
    }

    /// Whether prefill products use the int8 tensor cores where the chip has them (the
    /// default) or the dp4a tiles (for comparing the two; both are exact).
    pub fn set_tensor_cores(&mut self, on: bool) {
        self.use_tensor_cores = on;
    }

    /// Whether kernels are launched as programmatic dependents of the one before them where
    /// the chip can (compute capability 9.0+, the default), or strictly one after another.
    pub fn set_programmatic_launch(&mut self, on: bool) {
        self.use_programmatic_launch = on;
    }

    /// Queues a launch (run at the next flush).
    fn launch(&mut self, kernel: u16, grid: (u32, u32), block: u32, smem: u32, args: Vec<Arg>) {
        self.launch_3d(kernel, (grid.0, grid.1, 1), block, smem, args);
    }

    fn launch_3d(&mut self, kernel: u16, grid: (u32, u32, u32), block: u32, smem: u32, args: Vec<Arg>) {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return; // no rows: nothing to do
        }
        self.pending.push(Launch { kernel, grid, block, smem, args });
    }

    fn launch_now(&self, l: &Launch) -> Result<(), DriverError> {
        let mut params: Vec<*mut std::ffi::c_void> = l
            .args
            .iter()
            .map(|a| match a {
                Arg::U64(v) => v as *const u64 as *mut _,
                Arg::I32(v) => v as *const i32 as *mut _,
                Arg::F32(v) => v as *const f32 as *mut _,
            })
            .collect();
        use std::sync::atomic::Ordering::Relaxed;
        let programmatic = self.use_programmatic_launch && self.dev.programmatic_launch.load(Relaxed);
        match self.launch_with(l, &mut params, programmatic) {
            // A driver that refuses the attribute: every launch from now on goes in order.
            Err(e)
                if programmatic
                    && matches!(
                        e.0,
                        sys::CUresult::CUDA_ERROR_NOT_SUPPORTED | sys::CUresult::CUDA_ERROR_INVALID_VALUE
                    ) =>
            {
                self.dev.programmatic_launch.store(false, Relaxed);
                self.launch_with(l, &mut params, false)
            }
            r => r,
        }
    }

    /// One `cuLaunchKernelEx` of `l`, a programmatic dependent of the kernel before it or not.
    fn launch_with(
        &self,
        l: &Launch,
        params: &mut [*mut std::ffi::c_void],
        programmatic: bool,
    ) -> Result<(), DriverError> {
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
        };
        let cfg = sys::CUlaunchConfig {
            gridDimX: l.grid.0,
            gridDimY: l.grid.1,
            gridDimZ: l.grid.2,
            blockDimX: l.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: l.smem,
            hStream: self.dev.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(programmatic),
        };
        self.dev.ctx.bind_to_thread()?;
        // SAFETY: the function is one of the device's loaded kernels; `params` points at values
        // that live until the call returns (the driver copies them); every pointer argument is
        // a live allocation of this device (pending launches run before any read-back returns,
        // and the buffers they name outlive that), sized by the callers for the grid they
        // launch (each kernel's comment says what it touches).
        unsafe {
            sys::cuLaunchKernelEx(
                &cfg,
                self.dev.kernels.functions[l.kernel as usize],
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }

    /// Runs the queued launches: as a graph if this sequence has one, captured into one if it
    /// repeats the last flushed sequence, else launch by launch.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let list = std::mem::take(&mut self.pending);
        let r = self.run_launches(&list);
        let r = r.map_err(|e| self.err(e, "a kernel launch", 0));
        self.note(r);
        self.last_flushed = list;
    }

    fn run_launches(&mut self, list: &[Launch]) -> Result<(), DriverError> {
        if let Some(i) = self.graphs.iter().position(|g| g.launches == list) {
            let g = self.graphs.remove(i);
            let r = g.exec.launch();
            self.graphs.push(g); // most recently used last
            return r;
        }
        if !(self.use_graphs && list.len() >= GRAPH_MIN_LAUNCHES && list == self.last_flushed) {
            return list.iter().try_for_each(|l| self.launch_now(l));
        }
        let stream = self.dev.stream.clone();
        stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let captured = list.iter().try_for_each(|l| self.launch_now(l));
        let flags =
            cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let graph = stream.end_capture(flags);
        match (captured, graph) {
            (Ok(()), Ok(Some(exec))) => {
                exec.launch()?;
                if self.graphs.len() == GRAPHS_KEPT {
                    self.graphs.remove(0);
                }
                self.graphs.push(Graph { launches: list.to_vec(), exec });
                Ok(())
            }
            // A capture that failed leaves the work undone: run it plainly, without graphs.
            _ => {
                self.use_graphs = false;
                list.iter().try_for_each(|l| self.launch_now(l))
            }
        }
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Copies `data` to `slot`'s device buffer unless it already holds exactly that; returns the
/// device address. The copy is queued on the stream after all earlier work, so kernels that
/// still read the old values are not disturbed.
fn stage<T: DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + PartialEq>(
    stream: &Arc<CudaStream>,
    slot: &mut Staged<T>,
    data: &[T],
) -> Result<u64, DriverError> {
    if let Some(d) = &slot.dev {
        if slot.host == data {
            return Ok(d.ptr);
        }
    }
    let cap = slot.dev.as_ref().map_or(0, |d| d.len());
    if cap < data.len().max(1) {
        let len = data.len().max(64).next_power_of_two();
        slot.dev = Some(DeviceVec::new(stream.alloc_zeros::<T>(len)?, stream));
    }
    let d = slot.dev.as_mut().expect("allocated above");
    if !data.is_empty() {
        stream.memcpy_htod(data, &mut d.data.slice_mut(0..data.len()))?;
    }
    slot.host.clear();
    slot.host.extend_from_slice(data);
    Ok(d.ptr)
}

/// Threads of a row kernel's block (rows.cu): enough that a row of `width` values fits the
/// registers (ROW_CACHE values a thread), so that it is read once.
fn row_threads(width: usize) -> u32 {
    const ROW_CACHE: usize = 8;
    (width.div_ceil(ROW_CACHE).next_power_of_two()).clamp(256, 1024) as u32
}

fn grid_1d(n: usize, block: usize) -> (u32, u32) {
    (n.div_ceil(block).clamp(1, 1 << 20) as u32, 1)
}

impl CudaBackend {
    /// Makes the device's context current on this thread (a context may move between
    /// threads, e.g. to a scheduler's); launches do this themselves, copies do not.
    fn bind(&mut self) -> Result<(), BackendError> {
        self.dev.ctx.bind_to_thread().map_err(|e| self.err(e, "binding the context", 0))
    }

    fn staged(&mut self, which: fn(&mut Staging) -> &mut Staged<u32>, data: &[u32]) -> Option<u64> {
        if let Some(p) = which(&mut self.staging).current(data) {
            return Some(p);
        }
        // Queued launches may read the old values: they run first.
        self.flush();
        let r = self.bind();
        self.note(r);
        let stream = self.dev.stream.clone();
        match stage(&stream, which(&mut self.staging), data) {
            Ok(p) => Some(p),
            Err(e) => {
                let e = self.err(e, "copying metadata", std::mem::size_of_val(data));
                self.note(Err(e));
                None
            }
        }
    }

    fn staged_i32(&mut self, which: fn(&mut Staging) -> &mut Staged<i32>, data: &[i32]) -> Option<u64> {
        if let Some(p) = which(&mut self.staging).current(data) {
            return Some(p);
        }
        self.flush();
        let r = self.bind();
        self.note(r);
        let stream = self.dev.stream.clone();
        match stage(&stream, which(&mut self.staging), data) {
            Ok(p) => Some(p),
            Err(e) => {
                let e = self.err(e, "copying metadata", std::mem::size_of_val(data));
                self.note(Err(e));
                None
            }
        }
    }

    /// Parts to split each row attention block's context into: enough blocks to give every
    /// multiprocessor two, no more parts than key blocks, a power of two (the part count is in
    /// the launch, so a captured graph is replaced only when it changes).
    fn context_parts(&self, blocks: usize, key_blocks: usize) -> usize {
        let want = (2 * self.dev.multiprocessors).div_ceil(blocks.max(1));
        let parts = want.min(key_blocks).clamp(1, 64);
        1 << parts.ilog2()
    }

    /// The row attention kernels' scratch for `len` floats, grown as needed.
    fn attention_parts(&mut self, len: usize) -> Option<u64> {
        self.scratch(|b| &mut b.attention_parts, len, "attention scratch")
    }

    /// The device address of a scratch buffer of at least `len` elements, grown (to a power
    /// of two) when it is smaller; None after noting an allocation failure.
    fn scratch<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &mut self,
        slot: fn(&mut Self) -> &mut Option<DeviceVec<T>>,
        len: usize,
        what: &'static str,
    ) -> Option<u64> {
        if slot(self).as_ref().is_none_or(|p| p.len() < len) {
            // Queued launches may name the old scratch: they are enqueued before it is freed.
            self.flush();
            *slot(self) = None;
            match self.alloc::<T>(len.next_power_of_two(), what) {
                Ok(p) => *slot(self) = Some(p),
                Err(e) => {
                    self.note(Err(e));
                    return None;
                }
            }
        }
        slot(self).as_ref().map(|p| p.ptr)
    }

    /// rows.cu's `norm_quantize` of `rows` rows at `x`, adding the rows at `y` first unless it
    /// is 0.
    #[allow(clippy::too_many_arguments)]
    fn launch_norm_quantize(
        &mut self,
        x: u64,
        y: u64,
        gain: Option<&CudaVector>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut CudaQuant,
    ) {
        out.rows = rows;
        let g = gain.map_or(0, |g| g.data.ptr);
        let args = [
            Arg::from(x),
            y.into(),
            g.into(),
            (width as i32).into(),
            eps.into(),
            (out.stride as i32).into(),
            out.q.ptr.into(),
            out.scales.ptr.into(),
            out.sums.ptr.into(),
        ];
        self.launch(K::NormQuantize as u16, (rows as u32, 1), row_threads(width), 0, args.to_vec());
    }

    /// attention.cu's `rope_kv_store`, rotating the queries `q` (address, heads) of the same
    /// rows in the same launch when given.
    #[allow(clippy::too_many_arguments)]
    fn launch_rope_kv_store(
        &mut self,
        q: Option<(u64, usize)>,
        store: &mut CudaKvStore,
        layer: usize,
        k: &CudaBuffer,
        v: &CudaBuffer,
        positions: &[u32],
        slots: &[u32],
        inv_freq: &CudaVector,
        head_dim: usize,
    ) {
        let Some(pos) = self.staged(|s| &mut s.positions, positions) else { return };
        let Some(slot_ptr) = self.staged(|s| &mut s.slots, slots) else { return };
        let rows = positions.len();
        let n_kv = store.kv_dim / head_dim;
        let (q_ptr, n_q) = q.unwrap_or((0, 0));
        let off = store.layer_offset(layer);
        let args = [
            Arg::from(store.keys.ptr + off),
            (store.values.ptr + off).into(),
            dtype_code(store.kv_type).into(),
            k.data.ptr.into(),
            v.data.ptr.into(),
            pos.into(),
            slot_ptr.into(),
            inv_freq.data.ptr.into(),
            (rows as i32).into(),
            (n_kv as i32).into(),
            (head_dim as i32).into(),
            q_ptr.into(),
            (n_q as i32).into(),
        ];
        let pairs = rows * (n_q + n_kv) * head_dim / 2;
        self.launch(K::RopeKvStore as u16, grid_1d(pairs, 256), 256, 0, args.to_vec());
    }

    /// Ternary products of up to three matrices that read `x`.
    fn ternary(&mut self, ws: &[&CudaLinear], x: &CudaQuant, outs: &[u64]) {
        let m = x.rows;
        if m == 0 {
            return;
        }
        let wvec = (padded_cols(ws[0].cols) / 64) as i32;
        let xvec = (x.stride / 16) as i32;
        let mixed = ws.iter().any(|w| w.block_scales.is_some() || w.cols != ws[0].cols);
        if ws.len() > 1 && (mixed || ws.len() > 3) {
            for (w, &o) in ws.iter().zip(outs) {
                self.ternary(&[*w], x, &[o]);
            }
            return;
        }
        if let Some(d) = &ws[0].block_scales {
            let w = ws[0];
            let blocks = w.cols.div_ceil(256) as i32;
            let args = [
                Arg::from(w.words.ptr),
                d.ptr.into(),
                (w.rows as i32).into(),
                blocks.into(),
                w.mode.into(),
                w.scale.into(),
                x.q.ptr.into(),
                xvec.into(),
                x.scales.ptr.into(),
                (m as i32).into(),
                wvec.into(),
                outs[0].into(),
            ];
            self.launch(K::TernaryBlockScaled as u16, grid_1d(w.rows * m, 128), 128, 0, args.to_vec());
            return;
        }
        // The matrix arguments, unused slots empty (0 rows).
        let pick = |i: usize| ws.get(i).map(|w| (w.words.ptr, outs[i], w.rows as i32, w.mode, w.scale));
        let [a, b, c] = [pick(0), pick(1), pick(2)].map(|p| p.unwrap_or((0, 0, 0, 0, 1.0)));
        let mut args = vec![
            Arg::from(a.0),
            b.0.into(),
            c.0.into(),
            a.1.into(),
            b.1.into(),
            c.1.into(),
            a.2.into(),
            b.2.into(),
            c.2.into(),
            a.3.into(),
            b.3.into(),
            c.3.into(),
            a.4.into(),
            b.4.into(),
            c.4.into(),
        ];
        args.extend([
            Arg::from(x.q.ptr),
            xvec.into(),
            x.scales.ptr.into(),
            x.sums.ptr.into(),
            (m as i32).into(),
            wvec.into(),
        ]);
        let total_rows: usize = ws.iter().map(|w| w.rows).sum();
        if m <= GEMV_MAX_TOKENS {
            let grid = (total_rows.div_ceil(8) as u32, m.div_ceil(8) as u32);
            self.launch(K::TernaryGemv as u16, grid, 256, 0, args);
        } else if self.use_tensor_cores && self.dev.tensor_cores {
            let sms = self.dev.multiprocessors;
            let blocks_of =
                |tile: usize| ws.iter().map(|w| w.rows.div_ceil(tile)).sum::<usize>() * m.div_ceil(tile);
            // 64 x 64 tiles where they give every multiprocessor two blocks; 32 x 32 below that
            // (a decode step of many sequences), and K split where even those are too few.
            let (kernel, tile) = if m <= MMA_SMALL_MAX_TOKENS || blocks_of(64) < 2 * sms {
                (K::TernaryMmaSmall, 32)
            } else {
                (K::TernaryMma, 64)
            };
            let blocks = blocks_of(tile);
            let splits = split_k(blocks, wvec as usize, sms);
            let (mut part, mut done) = (0, 0);
            if splits > 1 {
                match (
                    self.scratch(|b| &mut b.mma_part, m * total_rows, "split-K sums"),
                    self.scratch(|b| &mut b.mma_done, blocks, "split-K counters"),
                ) {
                    (Some(p), Some(d)) => (part, done) = (p, d),
                    _ => return, // noted; reported at the next synchronize
                }
            }
            args.extend([Arg::from(part), done.into()]);
            let grid = ((blocks / m.div_ceil(tile)) as u32, m.div_ceil(tile) as u32, splits as u32);
            self.launch_3d(kernel as u16, grid, 128, 0, args);
        } else {
            let tiles: usize = ws.iter().map(|w| w.rows.div_ceil(64)).sum();
            let grid = (tiles as u32, m.div_ceil(64) as u32);
            self.launch(K::TernaryGemm as u16, grid, 256, 0, args);
        }
    }
}

/// How many blocks share each tile's K in `ternary_mma`: none (1) when the tiles' `blocks`
/// give every one of the `sms` multiprocessors two, else enough for about four each, with at
/// least four 128-column stages a block so that the copy ring still overlaps (rows of `wvec`
/// 64-column vectors). The split is exact (integer sums), so this only moves time.
fn split_k(blocks: usize, wvec: usize, sms: usize) -> usize {
    if blocks >= 2 * sms {
        return 1;
    }
    let stages = wvec.div_ceil(2);
    (4 * sms).div_ceil(blocks.max(1)).min(stages / 4).max(1)
}

/// A non-ternary matrix on the device: only float formats have kernels (see
/// [`CudaBackend::upload_dense_linear`]).
pub struct CudaDenseLinear(CudaDense);

impl Backend for CudaBackend {
    type Linear = CudaLinear;
    type Dense = CudaDense;
    type Int8Linear = CudaInt8;
    type Vector = CudaVector;
    type Buffer = CudaBuffer;
    type QuantBuffer = CudaQuant;
    type KvStore = CudaKvStore;
    type DenseLinear = CudaDenseLinear;
    type DenseInput = ();

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.dev.ordinal, self.dev.name)
    }

    /// Float formats (F32, F16, BF16) run on the float head's kernel, which computes the same
    /// dot products, and so do block formats set to run on f32 activations (decoded to f32 here:
    /// dequantized weights times float activations is what they compute). GGUF block formats on
    /// llama.cpp's int8 block products have no GPU kernel yet and are refused when the model
    /// loads.
    fn upload_dense_linear(&self, w: DenseLinear) -> Result<CudaDenseLinear, BackendError> {
        if w.float_activations() {
            let m = DenseMatrix { rows: w.rows(), cols: w.cols(), data: DenseData::F32(w.to_f32()) };
            return Ok(CudaDenseLinear(self.upload_dense(m)?));
        }
        if !w.format().is_float() {
            return Err(BackendError::Unsupported {
                device: self.name(),
                what: format!(
                    "{} weights (a {}x{} matrix) with int8 block activations: load with float \
                     activations (--dense-activations f32)",
                    w.format().name(),
                    w.rows(),
                    w.cols()
                ),
            });
        }
        // The host copy goes as soon as it is on the device; a matrix read from the checkpoint's
        // mapping has its pages released as the copy grows.
        Ok(CudaDenseLinear(self.upload_dense(w.into_dense_matrix())?))
    }

    fn dense_input(&self, _max_rows: usize, _width: usize) -> Result<(), BackendError> {
        // Float formats read the float activations as they are.
        Ok(())
    }

    fn dense_embedding(&mut self, table: &CudaDenseLinear, ids: &[u32], out: &mut CudaBuffer) {
        self.embedding(&table.0, ids, out)
    }

    fn dense_linear(
        &mut self,
        w: &CudaDenseLinear,
        x: &CudaBuffer,
        first: usize,
        rows: usize,
        _input: &mut (),
        out: &mut CudaBuffer,
    ) {
        self.lm_head(&w.0, x, first, rows, out)
    }

    fn upload_linear(&self, w: TernaryMatrix) -> Result<CudaLinear, BackendError> {
        let c = w.to_codes();
        let (mode, scale) = match c.scale {
            WeightScale::Multiply(m) => (0, m),
            WeightScale::Divide(d) => (1, d),
        };
        // The block-scaled kernel takes one scale per 256 columns (TQ1_0/TQ2_0); smaller groups
        // (Q1_0, Q2_0, PQ2_0, PTQ1_0) have no GPU kernel yet.
        if let Some(d) = c.group_scales.as_ref().filter(|d| d.group != 256) {
            return Err(BackendError::Unsupported {
                device: self.name(),
                what: format!(
                    "ternary weights with one scale per {} columns (a {}x{} matrix; only per-tensor or \
                     per-256 scales run on CUDA)",
                    d.group, c.rows, c.cols
                ),
            });
        }
        let words = self.upload(&pack_ternary(&c.codes, c.rows, c.cols), "ternary weights")?;
        let block_scales =
            c.group_scales.as_ref().map(|d| self.upload(&d.scales, "block scales")).transpose()?;
        Ok(CudaLinear { words, rows: c.rows, cols: c.cols, mode, scale, block_scales })
    }

    fn upload_dense(&self, m: DenseMatrix) -> Result<CudaDense, BackendError> {
        let (data, dtype) = match &m.data {
            DenseData::F32(v) => (DenseStore::F32(self.upload(v, "a float matrix")?), DT_F32),
            DenseData::Bf16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                (DenseStore::Half(self.upload(&bits, "a bf16 matrix")?), DT_BF16)
            }
            DenseData::F16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                (DenseStore::Half(self.upload(&bits, "an f16 matrix")?), DT_F16)
            }
        };
        Ok(CudaDense { data, dtype, rows: m.rows, cols: m.cols })
    }

    fn upload_int8(&self, m: Int8Matrix) -> Result<CudaInt8, BackendError> {
        let (rows, cols) = (m.rows(), m.cols());
        let weights = self.upload(&pad_int8_rows(&m.to_int8(), rows, cols), "int8 weights")?;
        let scales = self.upload(m.scales(), "int8 row scales")?;
        Ok(CudaInt8 { weights, scales, rows, cols })
    }

    fn upload_vector(&self, v: &[f32]) -> Result<CudaVector, BackendError> {
        Ok(CudaVector { data: self.upload(v, "a vector")? })
    }

    fn buffer(&self, len: usize) -> Result<CudaBuffer, BackendError> {
        Ok(CudaBuffer { data: self.alloc(len, "activations")? })
    }

    fn quant_buffer(&self, max_rows: usize, width: usize) -> Result<CudaQuant, BackendError> {
        let stride = padded_cols(width);
        Ok(CudaQuant {
            q: self.alloc(max_rows * stride, "int8 activations")?,
            scales: self.alloc(max_rows, "activation scales")?,
            sums: self.alloc(max_rows, "activation sums")?,
            width,
            stride,
            capacity: max_rows,
            rows: 0,
        })
    }

    fn kv_store(
        &self,
        layers: usize,
        blocks: usize,
        kv_dim: usize,
        kv_type: KvType,
    ) -> Result<CudaKvStore, BackendError> {
        let slots = blocks * BLOCK_TOKENS;
        let bytes = layers.saturating_mul(slots).saturating_mul(kv_dim).saturating_mul(kv_type.bytes());
        Ok(CudaKvStore {
            keys: self.alloc(bytes, "the KV cache")?,
            values: self.alloc(bytes, "the KV cache")?,
            layers,
            slots,
            kv_dim,
            kv_type,
        })
    }

    fn synchronize(&mut self) -> Result<(), BackendError> {
        self.flush();
        let r = self.bind();
        self.note(r);
        let r = self.dev.stream.synchronize().map_err(|e| self.err(e, "synchronizing", 0));
        self.note(r);
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn embedding(&mut self, table: &CudaDense, ids: &[u32], out: &mut CudaBuffer) {
        let Some(ids_ptr) = self.staged(|s| &mut s.ids, ids) else { return };
        let args = [
            Arg::from(table.ptr()),
            table.dtype.into(),
            ids_ptr.into(),
            (table.cols as i32).into(),
            out.data.ptr.into(),
        ];
        self.launch(K::Embedding as u16, (ids.len() as u32, 1), 256, 0, args.to_vec());
    }

    fn gather_rows(&mut self, x: &CudaBuffer, rows: &[u32], width: usize, out: &mut CudaBuffer) {
        let Some(rows_ptr) = self.staged(|s| &mut s.rows, rows) else { return };
        let args = [Arg::from(x.data.ptr), rows_ptr.into(), (width as i32).into(), out.data.ptr.into()];
        self.launch(K::GatherRows as u16, (rows.len() as u32, 1), 256, 0, args.to_vec());
    }

    fn rmsnorm(
        &mut self,
        x: &CudaBuffer,
        gain: Option<&CudaVector>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut CudaBuffer,
    ) {
        let g = gain.map_or(0, |g| g.data.ptr);
        let args = [Arg::from(x.data.ptr), g.into(), (width as i32).into(), eps.into(), out.data.ptr.into()];
        self.launch(K::Rmsnorm as u16, (rows as u32, 1), row_threads(width), 0, args.to_vec());
    }

    fn quantize(&mut self, x: &CudaBuffer, first: usize, rows: usize, width: usize, out: &mut CudaQuant) {
        out.rows = rows;
        let args = [
            Arg::from(x.data.ptr),
            (first as i32).into(),
            (width as i32).into(),
            (out.stride as i32).into(),
            out.q.ptr.into(),
            out.scales.ptr.into(),
            out.sums.ptr.into(),
        ];
        self.launch(K::Quantize as u16, (rows as u32, 1), row_threads(width), 0, args.to_vec());
    }

    fn norm_quantize(
        &mut self,
        x: &CudaBuffer,
        gain: Option<&CudaVector>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut CudaQuant,
    ) {
        // The kernel writes `x` only when it is given a `y` to add.
        self.launch_norm_quantize(x.data.ptr, 0, gain, rows, width, eps, out);
    }

    fn add_norm_quantize(
        &mut self,
        x: &mut CudaBuffer,
        y: &CudaBuffer,
        gain: Option<&CudaVector>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut CudaQuant,
    ) {
        self.launch_norm_quantize(x.data.ptr, y.data.ptr, gain, rows, width, eps, out);
    }

    fn gate_quantize(
        &mut self,
        act: Activation,
        gate: &CudaBuffer,
        up: &CudaBuffer,
        sub_norm: Option<&CudaVector>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut CudaQuant,
    ) {
        out.rows = rows;
        let g = sub_norm.map_or(0, |g| g.data.ptr);
        let args = [
            Arg::from(act_code(act)),
            gate.data.ptr.into(),
            up.data.ptr.into(),
            g.into(),
            (width as i32).into(),
            eps.into(),
            (out.stride as i32).into(),
            out.q.ptr.into(),
            out.scales.ptr.into(),
            out.sums.ptr.into(),
        ];
        self.launch(K::GateQuantize as u16, (rows as u32, 1), row_threads(width), 0, args.to_vec());
    }

    fn bitlinear(&mut self, w: &CudaLinear, x: &CudaQuant, out: &mut CudaBuffer) {
        self.ternary(&[w], x, &[out.data.ptr]);
    }

    fn bitlinear_many<const N: usize>(
        &mut self,
        ws: [&CudaLinear; N],
        x: &CudaQuant,
        outs: [&mut CudaBuffer; N],
    ) {
        let ptrs: Vec<u64> = outs.iter().map(|o| o.data.ptr).collect();
        self.ternary(&ws, x, &ptrs);
    }

    fn int8_linear(&mut self, w: &CudaInt8, x: &CudaQuant, out: &mut CudaBuffer) {
        let m = x.rows;
        let args = [
            Arg::from(w.weights.ptr),
            w.scales.ptr.into(),
            (w.rows as i32).into(),
            x.q.ptr.into(),
            ((x.stride / 16) as i32).into(),
            x.scales.ptr.into(),
            (m as i32).into(),
            ((padded_cols(w.cols) / 16) as i32).into(),
            out.data.ptr.into(),
        ];
        self.launch(
            K::Int8Gemv as u16,
            (w.rows.div_ceil(8) as u32, m.div_ceil(8) as u32),
            256,
            0,
            args.to_vec(),
        );
    }

    fn rope(
        &mut self,
        x: &mut CudaBuffer,
        inv_freq: &CudaVector,
        positions: &[u32],
        n_heads: usize,
        head_dim: usize,
    ) {
        let Some(pos) = self.staged(|s| &mut s.positions, positions) else { return };
        let rows = positions.len();
        let args = [
            Arg::from(x.data.ptr),
            inv_freq.data.ptr.into(),
            pos.into(),
            (rows as i32).into(),
            (n_heads as i32).into(),
            (head_dim as i32).into(),
        ];
        self.launch(K::Rope as u16, grid_1d(rows * n_heads * head_dim / 2, 256), 256, 0, args.to_vec());
    }

    fn rope_kv_store(
        &mut self,
        store: &mut CudaKvStore,
        layer: usize,
        k: &CudaBuffer,
        v: &CudaBuffer,
        positions: &[u32],
        slots: &[u32],
        inv_freq: &CudaVector,
        head_dim: usize,
    ) {
        self.launch_rope_kv_store(None, store, layer, k, v, positions, slots, inv_freq, head_dim);
    }

    fn rope_qk_store(
        &mut self,
        q: &mut CudaBuffer,
        n_heads: usize,
        store: &mut CudaKvStore,
        layer: usize,
        k: &CudaBuffer,
        v: &CudaBuffer,
        positions: &[u32],
        slots: &[u32],
        inv_freq: &CudaVector,
        head_dim: usize,
    ) {
        let q = Some((q.data.ptr, n_heads));
        self.launch_rope_kv_store(q, store, layer, k, v, positions, slots, inv_freq, head_dim);
    }

    fn attention(
        &mut self,
        q: &CudaBuffer,
        store: &CudaKvStore,
        layer: usize,
        tables: &[u32],
        segments: &[AttentionSegment],
        shape: HeadShape,
        out: &mut CudaBuffer,
    ) {
        let (n_heads, n_kv, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
        let chunks = hd.div_ceil(32);
        let Some(ki) = ATTENTION_CHUNKS.iter().position(|&c| c >= chunks) else {
            let e = self.shape(format!("attention over heads of {hd}: the kernels take heads of up to 256"));
            return self.note(Err(e));
        };
        // Heads per task: the largest divisor of the group size that fits a task's rows.
        let n_rep = n_heads / n_kv.max(1);
        let heads = (1..=n_rep.min(ATT_ROWS)).rev().find(|h| n_rep % h == 0).unwrap_or(1);
        let tile = (ATT_ROWS / heads).max(1);
        self.segment_host.clear();
        self.task_host.clear();
        self.row_task_host.clear();
        // Key blocks the longest row task sees: how far its context can be split.
        let mut row_key_blocks = 0;
        for (si, s) in segments.iter().enumerate() {
            self.segment_host.extend([
                s.first_row as i32,
                s.rows as i32,
                s.pos0 as i32,
                s.table_start as i32,
            ]);
            if s.rows <= ROW_ATTENTION_MAX_ROWS {
                for t in 0..s.rows {
                    self.row_task_host.extend([si as i32, t as i32]);
                }
                let keys = s.pos0 + s.rows;
                let seen = shape.window.map_or(keys, |w| w.min(keys) + BLOCK_TOKENS - 1);
                row_key_blocks = row_key_blocks.max(seen.div_ceil(BLOCK_TOKENS));
                continue;
            }
            // Last tiles first: they see the most keys.
            for t in (0..s.rows.div_ceil(tile)).rev() {
                let (t0, t1) = (t * tile, ((t + 1) * tile).min(s.rows));
                for head0 in (0..n_heads).step_by(heads) {
                    self.task_host.extend([si as i32, t0 as i32, t1 as i32, head0 as i32]);
                }
            }
        }
        let (tasks, row_tasks) = (self.task_host.len() / 4, self.row_task_host.len() / 2);
        if tasks + row_tasks == 0 {
            return;
        }
        let seg_host = std::mem::take(&mut self.segment_host);
        let task_host = std::mem::take(&mut self.task_host);
        let row_task_host = std::mem::take(&mut self.row_task_host);
        let seg_ptr = self.staged_i32(|s| &mut s.segments, &seg_host);
        let task_ptr = self.staged_i32(|s| &mut s.tasks, &task_host);
        let row_task_ptr = self.staged_i32(|s| &mut s.row_tasks, &row_task_host);
        self.segment_host = seg_host;
        self.task_host = task_host;
        self.row_task_host = row_task_host;
        let Some(table_ptr) = self.staged(|s| &mut s.tables, tables) else { return };
        let (Some(seg_ptr), Some(task_ptr), Some(row_task_ptr)) = (seg_ptr, task_ptr, row_task_ptr) else {
            return;
        };
        let off = store.layer_offset(layer);
        let (keys, values) = (store.keys.ptr + off, store.values.ptr + off);
        // 0: no window (a window of 0 keys is refused by the config).
        let window = shape.window.map_or(0, |w| w.min(i32::MAX as usize)) as i32;
        let kv_kernel = (3 * ki) as u16 + dtype_code(store.kv_type) as u16;
        // The arguments both attention kernels start with.
        let lead = [
            Arg::from(q.data.ptr),
            keys.into(),
            values.into(),
            (store.kv_dim as i32).into(),
            table_ptr.into(),
            seg_ptr.into(),
        ];
        let heads_args = [Arg::from(n_heads as i32), (n_kv as i32).into(), (hd as i32).into()];
        if tasks > 0 {
            let mut args = lead.to_vec();
            args.push(task_ptr.into());
            args.extend(heads_args);
            args.extend([Arg::from(heads as i32), shape.scale.into(), window.into(), out.data.ptr.into()]);
            let smem = attention_smem(ATTENTION_CHUNKS[ki]) as u32;
            self.launch(
                K::Attention as u16 + kv_kernel,
                (tasks as u32, 1),
                (ATT_WARPS * 32) as u32,
                smem,
                args,
            );
        }
        if row_tasks > 0 {
            let blocks = row_tasks * n_heads;
            let parts = self.context_parts(blocks, row_key_blocks);
            let parts_ptr = if parts > 1 {
                match self.attention_parts(blocks * parts * (hd + 2)) {
                    Some(p) => p,
                    None => return,
                }
            } else {
                0
            };
            let mut args = lead.to_vec();
            args.push(row_task_ptr.into());
            args.extend(heads_args);
            args.extend([Arg::from(shape.scale), window.into(), out.data.ptr.into(), parts_ptr.into()]);
            let id = K::Attention as u16 + ROW_ATTENTION as u16 + kv_kernel;
            self.launch(id, (blocks as u32, parts as u32), (ROW_WARPS * 32) as u32, 0, args);
            if parts > 1 {
                let args = [
                    Arg::from(parts_ptr),
                    (parts as i32).into(),
                    seg_ptr.into(),
                    row_task_ptr.into(),
                    (n_heads as i32).into(),
                    (hd as i32).into(),
                    out.data.ptr.into(),
                ];
                self.launch(
                    K::AttentionMerge as u16,
                    (blocks as u32, 1),
                    hd.next_power_of_two().clamp(32, 256) as u32,
                    0,
                    args.to_vec(),
                );
            }
        }
    }

    fn gate(
        &mut self,
        act: Activation,
        gate: &CudaBuffer,
        up: &CudaBuffer,
        len: usize,
        out: &mut CudaBuffer,
    ) {
        let args = [
            Arg::from(act_code(act)),
            gate.data.ptr.into(),
            up.data.ptr.into(),
            (len as u64).into(),
            out.data.ptr.into(),
        ];
        self.launch(K::Gate as u16, grid_1d(len, 256), 256, 0, args.to_vec());
    }

    fn add(&mut self, x: &mut CudaBuffer, y: &CudaBuffer, len: usize) {
        let args = [Arg::from(x.data.ptr), y.data.ptr.into(), (len as u64).into()];
        self.launch(K::Add as u16, grid_1d(len, 256), 256, 0, args.to_vec());
    }

    fn scale(&mut self, x: &mut CudaBuffer, len: usize, factor: f32) {
        let args = [Arg::from(x.data.ptr), factor.into(), (len as u64).into()];
        self.launch(K::Scale as u16, grid_1d(len, 256), 256, 0, args.to_vec());
    }

    fn lm_head(&mut self, w: &CudaDense, x: &CudaBuffer, first: usize, rows: usize, out: &mut CudaBuffer) {
        // Batches of bf16 heads on the tensor cores: the weights read once for 32 tokens.
        let tensor_cores = self.use_tensor_cores && self.dev.tensor_cores;
        if tensor_cores && w.dtype == DT_BF16 && w.cols.is_multiple_of(8) && rows >= HEAD_MMA_MIN_TOKENS {
            let Some(planes) = self.scratch(|b| &mut b.head_planes, 3 * rows * w.cols, "head scratch") else {
                return;
            };
            let args = [
                Arg::from(x.data.ptr),
                (first as i32).into(),
                (rows as i32).into(),
                (w.cols as i32).into(),
                planes.into(),
            ];
            self.launch(K::HeadSplit as u16, grid_1d(rows * w.cols, 256), 256, 0, args.to_vec());
            let args = [
                Arg::from(w.ptr()),
                (w.rows as i32).into(),
                (w.cols as i32).into(),
                planes.into(),
                (rows as i32).into(),
                out.data.ptr.into(),
            ];
            let grid = (rows.div_ceil(32) as u32, w.rows.div_ceil(64) as u32);
            self.launch(K::LmHeadMma as u16, grid, 128, 0, args.to_vec());
            return;
        }
        let args = [
            Arg::from(w.ptr()),
            w.dtype.into(),
            (w.rows as i32).into(),
            (w.cols as i32).into(),
            x.data.ptr.into(),
            (first as i32).into(),
            (rows as i32).into(),
            out.data.ptr.into(),
        ];
        self.launch(
            K::LmHead as u16,
            (w.rows.div_ceil(8) as u32, rows.div_ceil(8) as u32),
            256,
            0,
            args.to_vec(),
        );
    }

    fn read(&mut self, b: &CudaBuffer, offset: usize, out: &mut [f32]) -> Result<(), BackendError> {
        if offset + out.len() > b.data.len() {
            return Err(self.shape(format!(
                "reading {} values at {offset} of a buffer of {}",
                out.len(),
                b.data.len()
            )));
        }
        self.synchronize()?;
        if out.is_empty() {
            return Ok(());
        }
        let stream = self.dev.stream.clone();
        stream
            .memcpy_dtoh(&b.data.data.slice(offset..offset + out.len()), out)
            .map_err(|e| self.err(e, "reading back", 0))?;
        stream.synchronize().map_err(|e| self.err(e, "reading back", 0))
    }

    fn argmax_rows(&mut self, x: &CudaBuffer, width: usize, out: &mut [u32]) -> Result<(), BackendError> {
        let rows = out.len();
        if rows.saturating_mul(width) > x.data.len() {
            return Err(
                self.shape(format!("the argmax of {rows} rows of {width} in a buffer of {}", x.data.len()))
            );
        }
        if rows == 0 || width == 0 {
            out.fill(0);
            return Ok(());
        }
        let Some(ids) = self.scratch(|b| &mut b.argmax_ids, rows, "argmax ids") else {
            return self.synchronize(); // reports the failed allocation
        };
        let args = vec![Arg::from(x.data.ptr), (width as i32).into(), ids.into()];
        self.launch(K::ArgmaxRows as u16, (rows as u32, 1), 1024, 0, args);
        self.synchronize()?;
        let stream = self.dev.stream.clone();
        let ids = self.argmax_ids.as_ref().expect("allocated above");
        stream.memcpy_dtoh(&ids.data.slice(..rows), out).map_err(|e| self.err(e, "reading back", 0))?;
        stream.synchronize().map_err(|e| self.err(e, "reading back", 0))
    }

    fn write(&mut self, b: &mut CudaBuffer, offset: usize, data: &[f32]) -> Result<(), BackendError> {
        if offset + data.len() > b.data.len() {
            return Err(self.shape(format!(
                "writing {} values at {offset} of a buffer of {}",
                data.len(),
                b.data.len()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.flush();
        self.bind()?;
        let stream = self.dev.stream.clone();
        stream
            .memcpy_htod(data, &mut b.data.data.slice_mut(offset..offset + data.len()))
            .map_err(|e| self.err(e, "writing", std::mem::size_of_val(data)))
    }

    fn write_quant(&mut self, q: &[i8], scales: &[f32], out: &mut CudaQuant) -> Result<(), BackendError> {
        let rows = scales.len();
        if rows > out.capacity || q.len() != rows * out.width {
            return Err(self.shape(format!(
                "{} int8 values and {rows} scales are not tokens of width {} (capacity {})",
                q.len(),
                out.width,
                out.capacity
            )));
        }
        out.rows = rows;
        if rows == 0 {
            return Ok(());
        }
        self.flush();
        self.bind()?;
        let padded = pad_rows(q, rows, out.width, out.stride);
        let sums: Vec<i32> = q.chunks(out.width.max(1)).map(|r| r.iter().map(|&v| v as i32).sum()).collect();
        let stream = self.dev.stream.clone();
        let e = |e| self.err(e, "writing int8 activations", q.len());
        stream.memcpy_htod(&padded, &mut out.q.data.slice_mut(0..padded.len())).map_err(e)?;
        stream.memcpy_htod(scales, &mut out.scales.data.slice_mut(0..rows)).map_err(e)?;
        stream.memcpy_htod(&sums[..rows], &mut out.sums.data.slice_mut(0..rows)).map_err(e)
    }

    fn read_quant(&mut self, x: &CudaQuant, q: &mut [i8], scales: &mut [f32]) -> Result<(), BackendError> {
        let rows = scales.len();
        if rows > x.rows || q.len() != rows * x.width {
            return Err(self.shape(format!(
                "reading {rows} tokens ({} values) of a quantized buffer holding {} of width {}",
                q.len(),
                x.rows,
                x.width
            )));
        }
        self.synchronize()?;
        if rows == 0 {
            return Ok(());
        }
        let mut padded = vec![0i8; rows * x.stride];
        let stream = self.dev.stream.clone();
        let e = |e| self.err(e, "reading int8 activations", 0);
        stream.memcpy_dtoh(&x.q.data.slice(0..padded.len()), &mut padded).map_err(e)?;
        stream.memcpy_dtoh(&x.scales.data.slice(0..rows), scales).map_err(e)?;
        stream.synchronize().map_err(e)?;
        for t in 0..rows {
            q[t * x.width..(t + 1) * x.width].copy_from_slice(&padded[t * x.stride..t * x.stride + x.width]);
        }
        Ok(())
    }

    fn read_kv(
        &mut self,
        store: &CudaKvStore,
        layer: usize,
        slot: usize,
        key: &mut [f32],
        value: &mut [f32],
    ) -> Result<(), BackendError> {
        let d = store.kv_dim;
        if layer >= store.layers || slot >= store.slots || key.len() != d || value.len() != d {
            return Err(self.shape(format!(
                "slot {slot} of layer {layer} (kv_dim {}) in a store of {} layers × {} slots of {d}",
                key.len(),
                store.layers,
                store.slots
            )));
        }
        self.synchronize()?;
        let eb = store.elem_bytes();
        let start = store.layer_offset(layer) as usize + slot * d * eb;
        let stream = self.dev.stream.clone();
        for (data, out) in [(&store.keys, key), (&store.values, value)] {
            let mut bytes = vec![0u8; d * eb];
            stream
                .memcpy_dtoh(&data.data.slice(start..start + d * eb), &mut bytes)
                .map_err(|e| self.err(e, "reading the KV cache", 0))?;
            stream.synchronize().map_err(|e| self.err(e, "reading the KV cache", 0))?;
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(eb)) {
                *o = match store.kv_type {
                    KvType::F32 => f32::from_le_bytes(b.try_into().expect("4 bytes")),
                    KvType::Bf16 => half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                    KvType::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                };
            }
        }
        Ok(())
    }
}

fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Relu2 => 0,
        Activation::Silu => 1,
        Activation::GeluTanh => 2,
    }
}

/// `rows` rows of `width` into rows of `stride`, zero padded.
fn pad_rows(q: &[i8], rows: usize, width: usize, stride: usize) -> Vec<i8> {
    let mut out = vec![0i8; rows * stride];
    for t in 0..rows {
        out[t * stride..t * stride + width].copy_from_slice(&q[t * width..(t + 1) * width]);
    }
    out
}
