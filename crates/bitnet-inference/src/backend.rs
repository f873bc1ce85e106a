//! The coarse operations a device must provide to run the BitNet forward pass.
//!
//! The model is written once over this trait. A backend owns its layouts: it receives host
//! weights and keeps them however its kernels want. Allocation and uploads are fallible
//! (device memory runs out); the operations of a forward step are not, and a device reports
//! its first failure at the next [`Backend::synchronize`].
//!
//! Activation buffers are allocated once per context for the largest batch, and every
//! operation names how many rows (tokens) of them are live, so a decode step allocates nothing.
//! A batch's rows come from several sequences: row-wise operations (norms, quantization,
//! projections, the gate) run over all rows at once, while RoPE, the KV store and attention
//! take each row's position and cache slot.

use bitnet_core::DenseMatrix;
use bitnet_models::Activation;
use bitnet_quant::{DenseLinear, Int8Matrix, TernaryMatrix};

use crate::kv::KvType;

/// A backend's failure: allocation, transfer or the device itself.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("out of {device} memory allocating {what} ({bytes} bytes)")]
    OutOfMemory { device: String, what: &'static str, bytes: usize },
    #[error("{device}: {message}")]
    Device { device: String, message: String },
    /// A transfer whose sizes do not fit the buffer it names.
    #[error("{device}: {message}")]
    Shape { device: String, message: String },
    /// Weights this backend has no kernel for (say, a GGUF block format on a GPU).
    #[error("{device} cannot run {what} yet")]
    Unsupported { device: String, what: String },
}

/// Rows of one sequence in a batch, as attention sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionSegment {
    /// Index of the segment's first row in the batch.
    pub first_row: usize,
    pub rows: usize,
    /// Position of the first row in its sequence; the cache holds positions `0..pos0 + rows`.
    pub pos0: usize,
    /// Where the sequence's block table starts in the call's `tables`: block
    /// `tables[table_start + p / BLOCK_TOKENS]` holds position `p`.
    pub table_start: usize,
}

/// Head counts and size of one attention call, the factor on its scores and its window.
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The factor on `q · k`: `head_dim^-0.5`, or Gemma3's `query_pre_attn_scalar^-0.5`.
    pub scale: f32,
    /// A sliding-window layer's window: the query at position `p` sees keys
    /// `p + 1 - window ..= p` only. `None`: every earlier key.
    pub window: Option<usize>,
}

impl HeadShape {
    /// Causal attention over the whole context with the usual `head_dim^-0.5` scale.
    pub fn causal(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Self { n_heads, n_kv_heads, head_dim, scale: (head_dim as f32).powf(-0.5), window: None }
    }
}

/// `Send` so that a context can run on a worker thread of its pool.
pub trait Backend: Send {
    /// A ternary matrix in the device's kernel layout.
    type Linear: Send + Sync;
    /// A float matrix (embeddings, lm_head).
    type Dense: Send + Sync;
    /// An int8 matrix with one scale per row (the quantized lm_head).
    type Int8Linear: Send + Sync;
    /// A non-ternary matrix in its stored format (F16/BF16/F32 or a GGUF block format such as
    /// Q8_0, Q4_1, Q6_K): dense projections, and embeddings or heads stored in a block format.
    type DenseLinear: Send + Sync;
    /// Activations quantized as a dense matrix's format asks (llama.cpp's blocks of 32 or 256).
    type DenseInput: Send;
    /// A float vector (norm gains, RoPE frequencies).
    type Vector: Send + Sync;
    /// Float activations.
    type Buffer: Send;
    /// Int8 activations with one scale per token.
    type QuantBuffer: Send;
    /// Keys and values of every layer: `blocks × BLOCK_TOKENS` slots of `kv_dim` per layer.
    type KvStore: Send;

    fn name(&self) -> String;

    /// Takes a ternary matrix from the host. `w.to_codes()` gives it in no kernel's layout
    /// (row-major codes, [`bitnet_quant::WeightScale`], block scales): a device backend packs
    /// those for its own kernels, while the CPU backend keeps `w`, already in its layout.
    fn upload_linear(&self, w: TernaryMatrix) -> Result<Self::Linear, BackendError>;
    fn upload_dense(&self, m: DenseMatrix) -> Result<Self::Dense, BackendError>;
    fn upload_int8(&self, m: Int8Matrix) -> Result<Self::Int8Linear, BackendError>;
    fn upload_vector(&self, v: &[f32]) -> Result<Self::Vector, BackendError>;
    /// A dense matrix that products read (a projection, a head, a tied table); `w` may still
    /// read the checkpoint's mapping, and the backend lays it out as its kernels want it.
    fn upload_dense_linear(&self, w: DenseLinear) -> Result<Self::DenseLinear, BackendError>;
    /// An embedding table that only serves lookups (the head reads another matrix): a backend
    /// may leave it where it is, since a lookup reads only its tokens' rows.
    fn upload_dense_table(&self, w: DenseLinear) -> Result<Self::DenseLinear, BackendError> {
        self.upload_dense_linear(w)
    }
    /// Scratch for [`Backend::dense_linear`]'s quantized input, for up to `max_rows` rows of
    /// `width`.
    fn dense_input(&self, max_rows: usize, width: usize) -> Result<Self::DenseInput, BackendError>;
    fn buffer(&self, len: usize) -> Result<Self::Buffer, BackendError>;
    fn quant_buffer(&self, max_rows: usize, width: usize) -> Result<Self::QuantBuffer, BackendError>;
    fn kv_store(
        &self,
        layers: usize,
        blocks: usize,
        kv_dim: usize,
        kv_type: KvType,
    ) -> Result<Self::KvStore, BackendError>;
    /// Waits for the queued work and reports the first failure since the last call.
    fn synchronize(&mut self) -> Result<(), BackendError>;

    /// `out[t] = table[ids[t]]`.
    fn embedding(&mut self, table: &Self::Dense, ids: &[u32], out: &mut Self::Buffer);
    /// `out[t] = table[ids[t]]` for a table in a block format, decoding only those rows.
    fn dense_embedding(&mut self, table: &Self::DenseLinear, ids: &[u32], out: &mut Self::Buffer);
    /// `out[t] = W · x[first + t]` for `rows` float rows of `x`, quantized into `input` first as
    /// the matrix's format asks (nothing for a float format).
    fn dense_linear(
        &mut self,
        w: &Self::DenseLinear,
        x: &Self::Buffer,
        first: usize,
        rows: usize,
        input: &mut Self::DenseInput,
        out: &mut Self::Buffer,
    );
    /// `out[t] = x[rows[t]]` for rows of `width`: gathers the rows that want logits.
    fn gather_rows(&mut self, x: &Self::Buffer, rows: &[u32], width: usize, out: &mut Self::Buffer);
    /// RMSNorm of `rows` rows of `width`, with an optional gain.
    fn rmsnorm(
        &mut self,
        x: &Self::Buffer,
        gain: Option<&Self::Vector>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut Self::Buffer,
    );
    /// Per-token absmax int8 quantization of rows `first..first+rows` of `x` (rows of `width`).
    fn quantize(
        &mut self,
        x: &Self::Buffer,
        first: usize,
        rows: usize,
        width: usize,
        out: &mut Self::QuantBuffer,
    );
    /// RMSNorm of `rows` rows of `x` (with an optional gain) quantized per token straight
    /// into `out`: the normed floats exist one row at a time and are never stored.
    fn norm_quantize(
        &mut self,
        x: &Self::Buffer,
        gain: Option<&Self::Vector>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut Self::QuantBuffer,
    );
    /// `x += y`, then [`Self::norm_quantize`] of the sum: a block's residual add and the next
    /// block's input norm. Backends may do both in one pass over `x`; the sum must equal `add`'s.
    #[allow(clippy::too_many_arguments)]
    fn add_norm_quantize(
        &mut self,
        x: &mut Self::Buffer,
        y: &Self::Buffer,
        gain: Option<&Self::Vector>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut Self::QuantBuffer,
    ) {
        self.add(x, y, rows * width);
        self.norm_quantize(x, gain, rows, width, eps, out);
    }
    /// `act(gate) · up`, through the FFN sub-norm when there is one, quantized per token into
    /// `out` (the down projection's input) one row at a time.
    #[allow(clippy::too_many_arguments)]
    fn gate_quantize(
        &mut self,
        act: Activation,
        gate: &Self::Buffer,
        up: &Self::Buffer,
        sub_norm: Option<&Self::Vector>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut Self::QuantBuffer,
    );
    /// `out = BitLinear(x)` for the quantized rows in `x`.
    fn bitlinear(&mut self, w: &Self::Linear, x: &Self::QuantBuffer, out: &mut Self::Buffer);
    /// `outs[i] = BitLinear_i(x)` for matrices that read the same input (q, k, v; gate, up),
    /// as one unit of work for the device.
    fn bitlinear_many<const N: usize>(
        &mut self,
        ws: [&Self::Linear; N],
        x: &Self::QuantBuffer,
        outs: [&mut Self::Buffer; N],
    );
    /// `out = W · x` with int8 weights and activations, scaled back to float.
    fn int8_linear(&mut self, w: &Self::Int8Linear, x: &Self::QuantBuffer, out: &mut Self::Buffer);
    /// NeoX RoPE on rows of `n_heads` heads; row `t` is at position `positions[t]`.
    fn rope(
        &mut self,
        x: &mut Self::Buffer,
        inv_freq: &Self::Vector,
        positions: &[u32],
        n_heads: usize,
        head_dim: usize,
    );
    /// RoPE on the keys of every row (`n_kv_heads` heads, row `t` at `positions[t]`), written with
    /// their values straight into cache slot `slots[t]` of `layer`; `k` itself is left as it was.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_store(
        &mut self,
        store: &mut Self::KvStore,
        layer: usize,
        k: &Self::Buffer,
        v: &Self::Buffer,
        positions: &[u32],
        slots: &[u32],
        inv_freq: &Self::Vector,
        head_dim: usize,
    );
    /// [`Self::rope`] on the queries and [`Self::rope_kv_store`] of the keys and values, for
    /// the same rows, positions and frequencies: one pass where a backend can.
    #[allow(clippy::too_many_arguments)]
    fn rope_qk_store(
        &mut self,
        q: &mut Self::Buffer,
        n_heads: usize,
        store: &mut Self::KvStore,
        layer: usize,
        k: &Self::Buffer,
        v: &Self::Buffer,
        positions: &[u32],
        slots: &[u32],
        inv_freq: &Self::Vector,
        head_dim: usize,
    ) {
        self.rope(q, inv_freq, positions, n_heads, head_dim);
        self.rope_kv_store(store, layer, k, v, positions, slots, inv_freq, head_dim);
    }
    /// Causal attention of each segment's query rows over its own cached keys and values,
    /// found through its block table in `tables`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        q: &Self::Buffer,
        store: &Self::KvStore,
        layer: usize,
        tables: &[u32],
        segments: &[AttentionSegment],
        shape: HeadShape,
        out: &mut Self::Buffer,
    );
    /// `out = act(gate) · up` over `len` values.
    fn gate(
        &mut self,
        act: Activation,
        gate: &Self::Buffer,
        up: &Self::Buffer,
        len: usize,
        out: &mut Self::Buffer,
    );
    /// `x += y` over `len` values.
    fn add(&mut self, x: &mut Self::Buffer, y: &Self::Buffer, len: usize);
    /// `x *= factor` over `len` values (Gemma's embeddings times sqrt(hidden)).
    fn scale(&mut self, x: &mut Self::Buffer, len: usize, factor: f32);
    /// Logits of rows `first..first+rows` of `x`: `out[t] = W · x[first + t]`.
    fn lm_head(
        &mut self,
        w: &Self::Dense,
        x: &Self::Buffer,
        first: usize,
        rows: usize,
        out: &mut Self::Buffer,
    );
    /// Copies `out.len()` values starting at `offset` of a buffer to the host.
    fn read(&mut self, b: &Self::Buffer, offset: usize, out: &mut [f32]) -> Result<(), BackendError>;
    /// Greedy decoding's choice for each of the first `out.len()` rows of `width` values of `x`:
    /// [`crate::sampling::argmax`] of the row (the first index of its largest value; NaNs never
    /// win; 0 when nothing beats element 0). A device computes it where the rows are, so that
    /// only the ids cross to the host; the default reads the rows back.
    fn argmax_rows(&mut self, x: &Self::Buffer, width: usize, out: &mut [u32]) -> Result<(), BackendError> {
        let mut row = vec![0.0f32; width];
        for (r, id) in out.iter_mut().enumerate() {
            self.read(x, r * width, &mut row)?;
            *id = crate::sampling::argmax(&row);
        }
        Ok(())
    }

    // Transfers for callers that bring their own data, and for the conformance suite
    // ([`crate::conformance`]), which compares every operation's results across backends.

    /// Copies `data` into a buffer starting at `offset`.
    fn write(&mut self, b: &mut Self::Buffer, offset: usize, data: &[f32]) -> Result<(), BackendError>;
    /// Loads `scales.len()` already-quantized tokens: `q` holds their int8 rows of the buffer's
    /// width, `scales` their `s_a`.
    fn write_quant(
        &mut self,
        q: &[i8],
        scales: &[f32],
        out: &mut Self::QuantBuffer,
    ) -> Result<(), BackendError>;
    /// Copies the first `scales.len()` tokens of a quantized buffer (int8 rows of the buffer's
    /// width into `q`, and their scales) to the host.
    fn read_quant(
        &mut self,
        x: &Self::QuantBuffer,
        q: &mut [i8],
        scales: &mut [f32],
    ) -> Result<(), BackendError>;
    /// The key and value cached in `slot` of `layer`, widened to f32 (`kv_dim` each).
    fn read_kv(
        &mut self,
        store: &Self::KvStore,
        layer: usize,
        slot: usize,
        key: &mut [f32],
        value: &mut [f32],
    ) -> Result<(), BackendError>;
}
