//! The coarse operations a device must provide to run the BitNet forward pass.
//!
//! The model is written once over this trait. Buffers are allocated once per session for the
//! largest batch, and every operation names how many rows (tokens) of them are live, so a
//! decode step allocates nothing.

use bitnet_core::DenseMatrix;
use bitnet_models::Activation;
use bitnet_quant::{Int8Matrix, TernaryMatrix};

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Tokens in this call.
    pub rows: usize,
    /// Position of the first of them in the sequence.
    pub pos0: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// `Send` so that a whole generation loop can run on a worker thread of the pool.
pub trait Backend: Send {
    /// A ternary matrix in the device's kernel layout.
    type Linear: Send + Sync;
    /// A float matrix (embeddings, lm_head).
    type Dense: Send + Sync;
    /// An int8 matrix with one scale per row (the quantized lm_head).
    type Int8Linear: Send + Sync;
    /// A float vector (norm gains, RoPE frequencies).
    type Vector: Send + Sync;
    /// Float activations.
    type Buffer: Send;
    /// Int8 activations with one scale per token.
    type QuantBuffer: Send;
    /// Keys and values of every layer of one sequence.
    type KvCache: Send;

    fn name(&self) -> String;

    fn upload_linear(&self, w: TernaryMatrix) -> Self::Linear;
    fn upload_dense(&self, m: DenseMatrix) -> Self::Dense;
    fn upload_int8(&self, m: Int8Matrix) -> Self::Int8Linear;
    fn upload_vector(&self, v: &[f32]) -> Self::Vector;
    fn buffer(&self, len: usize) -> Self::Buffer;
    fn quant_buffer(&self, max_rows: usize, width: usize) -> Self::QuantBuffer;
    fn kv_cache(&self, layers: usize, max_tokens: usize, kv_dim: usize) -> Self::KvCache;

    /// `out[t] = table[ids[t]]`.
    fn embedding(&mut self, table: &Self::Dense, ids: &[u32], out: &mut Self::Buffer);
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
    /// NeoX RoPE on `rows` rows of `n_heads` heads, for positions `pos0..pos0+rows`.
    fn rope(
        &mut self,
        x: &mut Self::Buffer,
        inv_freq: &Self::Vector,
        rows: usize,
        pos0: usize,
        n_heads: usize,
        head_dim: usize,
    );
    /// RoPE on `rows` keys of `n_kv_heads` heads (positions `pos0..`), written with their values
    /// straight into `layer` of the cache; `k` itself is left as it was.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_store(
        &mut self,
        cache: &mut Self::KvCache,
        layer: usize,
        pos0: usize,
        rows: usize,
        k: &Self::Buffer,
        v: &Self::Buffer,
        inv_freq: &Self::Vector,
        head_dim: usize,
    );
    /// Causal attention of `q` over the cache of `layer` (positions `0..pos0+rows`).
    fn attention(
        &mut self,
        q: &Self::Buffer,
        cache: &Self::KvCache,
        layer: usize,
        shape: AttentionShape,
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
    fn read(&mut self, b: &Self::Buffer, offset: usize, out: &mut [f32]);
}
