//! The CPU backend: host buffers, ternary kernels from bitnet-quant, rayon threads.

use crate::attention::{Attention, Kernel, KvSlice};
use crate::backend::{AttentionSegment, Backend, BackendError, HeadShape};
use crate::kv::{KvType, BLOCK_TOKENS};
use bitnet_core::{ops, DenseMatrix};
use bitnet_models::Activation;
use bitnet_quant::dense::{Q40Lanes, Q41Lanes, Q4Lanes, Q6Lanes, Q8Lanes};
use bitnet_quant::{
    DenseActivations, DenseLinear, Int8Matrix, KernelPath, QuantizedActivations, TernaryMatrix,
};

/// One layer's keys or values, `[slots, kv_dim]`.
pub enum KvData {
    F32(Vec<f32>),
    /// bf16 or f16 bits, as the store's type says.
    Half(Vec<u16>),
}

/// Keys and values of every layer in blocks of [`BLOCK_TOKENS`] slots.
pub struct CpuKvStore {
    pub keys: Vec<KvData>,
    pub values: Vec<KvData>,
    pub kv_dim: usize,
    pub kv_type: KvType,
}

impl KvData {
    fn len(&self) -> usize {
        match self {
            KvData::F32(x) => x.len(),
            KvData::Half(x) => x.len(),
        }
    }
}

impl CpuKvStore {
    fn slice<'a>(&self, data: &'a KvData) -> KvSlice<'a> {
        match (data, self.kv_type) {
            (KvData::F32(x), _) => KvSlice::F32(x),
            (KvData::Half(x), KvType::Bf16) => KvSlice::Bf16(x),
            (KvData::Half(x), _) => KvSlice::F16(x),
        }
    }

    /// Writes `src` into slot `slot` of one layer's data, rounding to the store's type.
    fn put(kv_type: KvType, data: &mut KvData, slot: usize, kv_dim: usize, src: &[f32]) {
        match data {
            KvData::F32(x) => x[slot * kv_dim..(slot + 1) * kv_dim].copy_from_slice(src),
            KvData::Half(x) => {
                let dst = &mut x[slot * kv_dim..(slot + 1) * kv_dim];
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = match kv_type {
                        KvType::Bf16 => half::bf16::from_f32(v).to_bits(),
                        _ => half::f16::from_f32(v).to_bits(),
                    };
                }
            }
        }
    }
}

/// A dense (non-ternary) matrix on the CPU: as stored, or Q8_0 / Q6_K / Q4_K / Q4_0 / Q4_1
/// rows-in-lanes on x86 ([`CpuBackend::upload_dense_linear`]).
#[derive(Clone, Debug)]
pub enum CpuDenseLinear {
    Stored(DenseLinear),
    Q8Lanes(Q8Lanes),
    Q6Lanes(Q6Lanes),
    Q4Lanes(Q4Lanes),
    Q40Lanes(Q40Lanes),
    Q41Lanes(Q41Lanes),
}

/// `$body` on whichever matrix `$w` holds, named `$m` (the forms share these methods).
macro_rules! on_matrix {
    ($w:expr, $m:ident => $body:expr) => {
        match $w {
            CpuDenseLinear::Stored($m) => $body,
            CpuDenseLinear::Q8Lanes($m) => $body,
            CpuDenseLinear::Q6Lanes($m) => $body,
            CpuDenseLinear::Q4Lanes($m) => $body,
            CpuDenseLinear::Q40Lanes($m) => $body,
            CpuDenseLinear::Q41Lanes($m) => $body,
        }
    };
}

impl CpuDenseLinear {
    pub fn rows(&self) -> usize {
        on_matrix!(self, m => m.rows())
    }
    pub fn cols(&self) -> usize {
        on_matrix!(self, m => m.cols())
    }
}

#[derive(Default)]
pub struct CpuBackend {
    /// Attention scratch (per worker: packed queries, output rows, a key tile's scores),
    /// grown to the largest call seen and then reused.
    scratch: Vec<f32>,
    /// cos/sin for the rows of one call.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    /// One row of floats between a fused producer (norm, gate) and the quantizer, and one rotated key.
    row: Vec<f32>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Element types whose all-zero bytes are a valid value, their zero.
///
/// # Safety
/// Implement only for types for which every all-zero bit pattern is a valid value.
pub(crate) unsafe trait ZeroBits: Copy {}
// SAFETY: zero bits are 0.0, 0 and +0 respectively.
unsafe impl ZeroBits for f32 {}
// SAFETY: as above.
unsafe impl ZeroBits for i8 {}
// SAFETY: as above.
unsafe impl ZeroBits for u16 {}

/// A zeroed vector of `len` elements, or an error instead of an abort when memory is short.
/// The memory comes zeroed from the allocator (calloc: a large block is fresh pages, which
/// become resident only when written), so buffers sized for the largest batch or the whole
/// context cost memory only as they are used.
pub(crate) fn try_vec<T: ZeroBits>(len: usize, what: &'static str) -> Result<Vec<T>, BackendError> {
    let out_of_memory = || BackendError::OutOfMemory {
        device: "cpu".into(),
        what,
        bytes: len.saturating_mul(size_of::<T>()),
    };
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| out_of_memory())?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(out_of_memory());
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `len` values of
    // `T` (what a `Vec` of capacity `len` uses), and all of them are initialised: zero bits
    // are a valid `T` (`ZeroBits`).
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Multiply-adds (of QKᵀ and PV, unmasked) below which attention runs on the calling thread (2B-4T decoding: a context
/// of about 800 tokens).
const ATTENTION_PARALLEL_MIN: usize = 1 << 22;

fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// `out = act(gate) · up`.
fn gated(act: Activation, gate: &[f32], up: &[f32], out: &mut [f32]) {
    match act {
        Activation::Relu2 => ops::relu2_mul(gate, up, out),
        Activation::Silu => ops::silu_mul(gate, up, out),
        Activation::GeluTanh => ops::gelu_tanh_mul(gate, up, out),
    }
}

impl CpuBackend {
    /// cos/sin of each row's position into `rope_cos`/`rope_sin` (`half` per row).
    fn rope_table(&mut self, inv_freq: &[f32], positions: &[u32], half: usize) {
        let rows = positions.len();
        grow(&mut self.rope_cos, rows * half);
        grow(&mut self.rope_sin, rows * half);
        for (t, &pos) in positions.iter().enumerate() {
            let (c, s) =
                (&mut self.rope_cos[t * half..(t + 1) * half], &mut self.rope_sin[t * half..(t + 1) * half]);
            ops::rope_cos_sin(pos as usize, inv_freq, c, s);
        }
    }
}

impl Backend for CpuBackend {
    type Linear = TernaryMatrix;
    type Dense = DenseMatrix;
    type Int8Linear = Int8Matrix;
    type Vector = Vec<f32>;
    type Buffer = Vec<f32>;
    type QuantBuffer = QuantizedActivations;
    type KvStore = CpuKvStore;
    type DenseLinear = CpuDenseLinear;
    type DenseInput = DenseActivations;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload_linear(&self, w: TernaryMatrix) -> Result<TernaryMatrix, BackendError> {
        Ok(w)
    }
    fn upload_dense(&self, m: DenseMatrix) -> Result<DenseMatrix, BackendError> {
        Ok(m)
    }
    fn upload_int8(&self, m: Int8Matrix) -> Result<Int8Matrix, BackendError> {
        Ok(m)
    }
    fn upload_vector(&self, v: &[f32]) -> Result<Vec<f32>, BackendError> {
        let mut out = try_vec(v.len(), "a vector")?;
        out.copy_from_slice(v);
        Ok(out)
    }
    /// Q8_0, Q6_K, Q4_K, Q4_0 and Q4_1 on an x86 CPU (AVX2 or AVX-512 VNNI) are laid out
    /// rows-in-lanes ([`Q8Lanes`], [`Q6Lanes`], [`Q4Lanes`], [`Q40Lanes`], [`Q41Lanes`]: the
    /// same outputs, a product that reads the weights as one stream); every other matrix is kept as stored, with bytes of its own (a matrix that still
    /// reads the checkpoint's mapping is copied a block of rows at a time, releasing the source
    /// as it goes).
    fn upload_dense_linear(&self, w: DenseLinear) -> Result<CpuDenseLinear, BackendError> {
        let path = KernelPath::active();
        // The first layout that takes this matrix's format (at most one does).
        macro_rules! lanes_of {
            ($($form:ident),*) => {$(
                if $form::suits(&w, path) {
                    if let Some(lanes) = $form::from_stored(&w) {
                        return Ok(CpuDenseLinear::$form(lanes));
                    }
                }
            )*};
        }
        lanes_of!(Q8Lanes, Q6Lanes, Q4Lanes, Q40Lanes, Q41Lanes);
        Ok(CpuDenseLinear::Stored(w.into_owned()))
    }
    /// Left as given: a table read from a checkpoint's mapping pages in only the rows looked up.
    fn upload_dense_table(&self, w: DenseLinear) -> Result<CpuDenseLinear, BackendError> {
        Ok(CpuDenseLinear::Stored(w))
    }
    fn dense_input(&self, _max_rows: usize, _width: usize) -> Result<DenseActivations, BackendError> {
        // Sized at first use: one buffer serves every format that reads the same width.
        Ok(DenseActivations::new())
    }
    fn buffer(&self, len: usize) -> Result<Vec<f32>, BackendError> {
        try_vec(len, "activations")
    }
    fn quant_buffer(&self, max_rows: usize, width: usize) -> Result<QuantizedActivations, BackendError> {
        // Checked first so that the allocation inside cannot abort.
        try_vec::<i8>(max_rows.saturating_mul(width), "int8 activations")?;
        Ok(QuantizedActivations::new(max_rows, width))
    }
    fn kv_store(
        &self,
        layers: usize,
        blocks: usize,
        kv_dim: usize,
        kv_type: KvType,
    ) -> Result<CpuKvStore, BackendError> {
        let len = blocks.saturating_mul(BLOCK_TOKENS).saturating_mul(kv_dim);
        let data = || -> Result<KvData, BackendError> {
            Ok(match kv_type {
                KvType::F32 => KvData::F32(try_vec(len, "the KV cache")?),
                KvType::Bf16 | KvType::F16 => KvData::Half(try_vec(len, "the KV cache")?),
            })
        };
        Ok(CpuKvStore {
            keys: (0..layers).map(|_| data()).collect::<Result<_, _>>()?,
            values: (0..layers).map(|_| data()).collect::<Result<_, _>>()?,
            kv_dim,
            kv_type,
        })
    }
    fn synchronize(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn embedding(&mut self, table: &DenseMatrix, ids: &[u32], out: &mut Vec<f32>) {
        let w = table.cols;
        for (t, &id) in ids.iter().enumerate() {
            table.row_f32(id as usize, &mut out[t * w..(t + 1) * w]);
        }
    }

    fn dense_embedding(&mut self, table: &CpuDenseLinear, ids: &[u32], out: &mut Vec<f32>) {
        let w = table.cols();
        for (t, &id) in ids.iter().enumerate() {
            let row = &mut out[t * w..(t + 1) * w];
            // Ids were checked against the vocabulary before the call.
            on_matrix!(table, m => m.dequantize_row(id as usize, row)).expect("an id inside the table");
        }
    }

    fn dense_linear(
        &mut self,
        w: &CpuDenseLinear,
        x: &Vec<f32>,
        first: usize,
        rows: usize,
        input: &mut DenseActivations,
        out: &mut Vec<f32>,
    ) {
        let (k, n) = (w.cols(), w.rows());
        let kind = on_matrix!(w, m => m.activation_kind());
        // The model sizes every buffer for its shapes: a mismatch here is a bug, not bad input.
        input.quantize(kind, &x[first * k..(first + rows) * k], rows, k).expect("dense input shape");
        let out = &mut out[..rows * n];
        on_matrix!(w, m => m.forward_quantized(input, out)).expect("dense product shape");
    }

    fn gather_rows(&mut self, x: &Vec<f32>, rows: &[u32], width: usize, out: &mut Vec<f32>) {
        for (t, &r) in rows.iter().enumerate() {
            let r = r as usize;
            out[t * width..(t + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
        }
    }

    fn rmsnorm(
        &mut self,
        x: &Vec<f32>,
        gain: Option<&Vec<f32>>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut Vec<f32>,
    ) {
        ops::rmsnorm(&x[..rows * width], gain.map(|g| g.as_slice()), width, eps, &mut out[..rows * width]);
    }

    fn quantize(
        &mut self,
        x: &Vec<f32>,
        first: usize,
        rows: usize,
        width: usize,
        out: &mut QuantizedActivations,
    ) {
        out.quantize(&x[first * width..(first + rows) * width], rows);
    }

    fn norm_quantize(
        &mut self,
        x: &Vec<f32>,
        gain: Option<&Vec<f32>>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut QuantizedActivations,
    ) {
        grow(&mut self.row, width);
        let gain = gain.map(|g| g.as_slice());
        out.quantize_each(rows, &mut self.row[..width], |t, row| {
            ops::rmsnorm_row(&x[t * width..(t + 1) * width], gain, eps, row)
        });
    }

    fn gate_quantize(
        &mut self,
        act: Activation,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        sub_norm: Option<&Vec<f32>>,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut QuantizedActivations,
    ) {
        grow(&mut self.row, width);
        let sub_norm = sub_norm.map(|g| g.as_slice());
        out.quantize_each(rows, &mut self.row[..width], |t, row| {
            let (g, u) = (&gate[t * width..(t + 1) * width], &up[t * width..(t + 1) * width]);
            gated(act, g, u, row);
            if sub_norm.is_some() {
                ops::rmsnorm_row_in_place(row, sub_norm, eps);
            }
        });
    }

    fn bitlinear(&mut self, w: &TernaryMatrix, x: &QuantizedActivations, out: &mut Vec<f32>) {
        w.forward(x, &mut out[..x.m() * w.rows()]);
    }

    fn bitlinear_many<const N: usize>(
        &mut self,
        ws: [&TernaryMatrix; N],
        x: &QuantizedActivations,
        outs: [&mut Vec<f32>; N],
    ) {
        let m = x.m();
        let mut i = 0;
        let outs = outs.map(|o| {
            let rows = ws[i].rows();
            i += 1;
            &mut o[..m * rows]
        });
        TernaryMatrix::forward_many(ws, x, outs);
    }

    fn int8_linear(&mut self, w: &Int8Matrix, x: &QuantizedActivations, out: &mut Vec<f32>) {
        w.forward(x, &mut out[..x.m() * w.rows()]);
    }

    fn rope(
        &mut self,
        x: &mut Vec<f32>,
        inv_freq: &Vec<f32>,
        positions: &[u32],
        n_heads: usize,
        head_dim: usize,
    ) {
        let half = head_dim / 2;
        self.rope_table(inv_freq, positions, half);
        let width = n_heads * head_dim;
        for (t, row) in x[..positions.len() * width].chunks_exact_mut(width).enumerate() {
            let (c, s) = (&self.rope_cos[t * half..(t + 1) * half], &self.rope_sin[t * half..(t + 1) * half]);
            ops::rope_neox(row, head_dim, c, s);
        }
    }

    fn rope_kv_store(
        &mut self,
        store: &mut CpuKvStore,
        layer: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        positions: &[u32],
        slots: &[u32],
        inv_freq: &Vec<f32>,
        head_dim: usize,
    ) {
        let (d, half, kv_type) = (store.kv_dim, head_dim / 2, store.kv_type);
        self.rope_table(inv_freq, positions, half);
        grow(&mut self.row, d);
        for (t, &slot) in slots.iter().enumerate() {
            let (c, s) = (&self.rope_cos[t * half..(t + 1) * half], &self.rope_sin[t * half..(t + 1) * half]);
            let rotated = &mut self.row[..d];
            ops::rope_neox_into(&k[t * d..(t + 1) * d], head_dim, c, s, rotated);
            CpuKvStore::put(kv_type, &mut store.keys[layer], slot as usize, d, rotated);
            CpuKvStore::put(kv_type, &mut store.values[layer], slot as usize, d, &v[t * d..(t + 1) * d]);
        }
    }

    fn attention(
        &mut self,
        q: &Vec<f32>,
        store: &CpuKvStore,
        layer: usize,
        tables: &[u32],
        segments: &[AttentionSegment],
        shape: HeadShape,
        out: &mut Vec<f32>,
    ) {
        let a = Attention {
            q,
            keys: store.slice(&store.keys[layer]),
            values: store.slice(&store.values[layer]),
            kv_dim: store.kv_dim,
            tables,
            segments,
            n_heads: shape.n_heads,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            scale: shape.scale,
            window: shape.window,
        };
        // A decoded token's attention over a short context is tens of microseconds: on the
        // calling thread it costs no fork-join, which under load can wait a whole scheduler
        // slice for a preempted helper.
        let workers =
            if a.work() < ATTENTION_PARALLEL_MIN { 1 } else { bitnet_core::threads::parallel_threads() };
        a.run(Kernel::detect(shape.head_dim), workers, &mut self.scratch, out);
    }

    fn gate(&mut self, act: Activation, gate: &Vec<f32>, up: &Vec<f32>, len: usize, out: &mut Vec<f32>) {
        gated(act, &gate[..len], &up[..len], &mut out[..len]);
    }

    fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) {
        ops::add_assign(&mut x[..len], &y[..len]);
    }

    fn scale(&mut self, x: &mut Vec<f32>, len: usize, factor: f32) {
        ops::scale(&mut x[..len], factor);
    }

    fn lm_head(&mut self, w: &DenseMatrix, x: &Vec<f32>, first: usize, rows: usize, out: &mut Vec<f32>) {
        w.matmul(&x[first * w.cols..(first + rows) * w.cols], rows, &mut out[..rows * w.rows]);
    }

    fn read(&mut self, b: &Vec<f32>, offset: usize, out: &mut [f32]) -> Result<(), BackendError> {
        let src = b.get(offset..offset + out.len()).ok_or_else(|| {
            shape(format!("reading {} values at {offset} of a buffer of {}", out.len(), b.len()))
        })?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn argmax_rows(&mut self, x: &Vec<f32>, width: usize, out: &mut [u32]) -> Result<(), BackendError> {
        let rows = x.get(..out.len() * width).ok_or_else(|| {
            shape(format!("the argmax of {} rows of {width} in a buffer of {}", out.len(), x.len()))
        })?;
        for (id, row) in out.iter_mut().zip(rows.chunks_exact(width.max(1))) {
            *id = crate::sampling::argmax(row);
        }
        Ok(())
    }

    fn write(&mut self, b: &mut Vec<f32>, offset: usize, data: &[f32]) -> Result<(), BackendError> {
        let len = b.len();
        let dst = b.get_mut(offset..offset + data.len()).ok_or_else(|| {
            shape(format!("writing {} values at {offset} of a buffer of {len}", data.len()))
        })?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn write_quant(
        &mut self,
        q: &[i8],
        scales: &[f32],
        out: &mut QuantizedActivations,
    ) -> Result<(), BackendError> {
        out.set_int8(q, scales, scales.len()).map_err(|e| shape(e.to_string()))
    }

    fn read_quant(
        &mut self,
        x: &QuantizedActivations,
        q: &mut [i8],
        scales: &mut [f32],
    ) -> Result<(), BackendError> {
        let (rows, k) = (scales.len(), x.k());
        if rows > x.m() || q.len() != rows * k {
            return Err(shape(format!(
                "reading {rows} tokens ({} values) of a quantized buffer holding {} of width {k}",
                q.len(),
                x.m()
            )));
        }
        for t in 0..rows {
            q[t * k..(t + 1) * k].copy_from_slice(x.row(t));
            scales[t] = x.scale(t);
        }
        Ok(())
    }

    fn read_kv(
        &mut self,
        store: &CpuKvStore,
        layer: usize,
        slot: usize,
        key: &mut [f32],
        value: &mut [f32],
    ) -> Result<(), BackendError> {
        let d = store.kv_dim;
        let slots = store.keys.first().map_or(0, KvData::len) / d.max(1);
        if layer >= store.keys.len() || slot >= slots || key.len() != d || value.len() != d {
            return Err(shape(format!(
                "slot {slot} of layer {layer} (kv_dim {}) in a store of {} layers × {slots} slots of {d}",
                key.len(),
                store.keys.len()
            )));
        }
        for (data, out) in [(&store.keys[layer], key), (&store.values[layer], value)] {
            let range = slot * d..(slot + 1) * d;
            match (data, store.kv_type) {
                (KvData::F32(x), _) => out.copy_from_slice(&x[range]),
                (KvData::Half(x), KvType::Bf16) => {
                    out.iter_mut().zip(&x[range]).for_each(|(o, &b)| *o = half::bf16::from_bits(b).to_f32())
                }
                (KvData::Half(x), _) => {
                    out.iter_mut().zip(&x[range]).for_each(|(o, &b)| *o = half::f16::from_bits(b).to_f32())
                }
            }
        }
        Ok(())
    }
}

fn shape(message: String) -> BackendError {
    BackendError::Shape { device: "cpu".into(), message }
}

#[cfg(test)]
mod fused_tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 31) % 1009) as f32 - 504.0) * 0.0037).collect()
    }

    fn same(a: &QuantizedActivations, b: &QuantizedActivations) {
        assert_eq!(a.m(), b.m());
        for t in 0..a.m() {
            assert_eq!(a.row(t), b.row(t), "token {t}");
            assert_eq!(a.scale(t).to_bits(), b.scale(t).to_bits());
            assert_eq!(a.sum(t), b.sum(t));
        }
    }

    /// The fused passes are the unfused ones, value for value.
    #[test]
    fn fused_norm_gate_and_rope_equal_the_separate_steps() {
        let mut b = CpuBackend::new();
        for (rows, width) in [(1, 256), (3, 300), (5, 64)] {
            let (x, g, u, gain) =
                (data(rows * width, 1), data(rows * width, 2), data(rows * width, 3), data(width, 4));
            let mut fused = QuantizedActivations::new(rows, width);
            let mut plain = QuantizedActivations::new(rows, width);
            let mut normed = vec![0.0; rows * width];
            for gain in [Some(&gain), None] {
                b.norm_quantize(&x, gain, rows, width, 1e-5, &mut fused);
                b.rmsnorm(&x, gain, rows, width, 1e-5, &mut normed);
                b.quantize(&normed, 0, rows, width, &mut plain);
                same(&fused, &plain);
                for act in [Activation::Relu2, Activation::Silu] {
                    b.gate_quantize(act, &g, &u, gain, rows, width, 1e-5, &mut fused);
                    let mut gated = vec![0.0; rows * width];
                    b.gate(act, &g, &u, rows * width, &mut gated);
                    if gain.is_some() {
                        b.rmsnorm(&gated, gain, rows, width, 1e-5, &mut normed);
                        gated.copy_from_slice(&normed);
                    }
                    b.quantize(&gated, 0, rows, width, &mut plain);
                    same(&fused, &plain);
                }
            }
        }
        let (head_dim, kv_heads, rows) = (16, 2, 3);
        let d = head_dim * kv_heads;
        let inv_freq = ops::rope_inv_freq(10_000.0, head_dim);
        let (k, v) = (data(rows * d, 5), data(rows * d, 6));
        let mut store = b.kv_store(2, 2, d, KvType::F32).unwrap();
        let (positions, slots) = ([4, 5, 9], [40, 7, 33]);
        b.rope_kv_store(&mut store, 1, &k, &v, &positions, &slots, &inv_freq, head_dim);
        let mut rotated = k.clone();
        b.rope(&mut rotated, &inv_freq, &positions, kv_heads, head_dim);
        let (KvData::F32(keys), KvData::F32(values)) = (&store.keys[1], &store.values[1]) else {
            unreachable!("an f32 store")
        };
        for (t, &slot) in slots.iter().enumerate() {
            let slot = slot as usize;
            assert_eq!(&keys[slot * d..(slot + 1) * d], &rotated[t * d..(t + 1) * d]);
            assert_eq!(&values[slot * d..(slot + 1) * d], &v[t * d..(t + 1) * d]);
        }
        let KvData::F32(layer0) = &store.keys[0] else { unreachable!("an f32 store") };
        assert!(layer0.iter().all(|&x| x == 0.0));
    }
}
