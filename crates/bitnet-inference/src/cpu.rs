//! The CPU backend: host buffers, ternary kernels from bitnet-quant, rayon threads.

use crate::attention::{Attention, Kernel};
use crate::backend::{AttentionShape, Backend};
use bitnet_core::{ops, DenseMatrix};
use bitnet_models::Activation;
use bitnet_quant::{Int8Matrix, QuantizedActivations, TernaryMatrix};

/// Keys and values of every layer, each `[max_tokens, kv_dim]`.
pub struct CpuKvCache {
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub kv_dim: usize,
    pub max_tokens: usize,
}

#[derive(Default)]
pub struct CpuBackend {
    /// Attention scratch (per worker: packed queries, output rows, a key tile's scores),
    /// grown to the largest call seen and then reused.
    scratch: Vec<f32>,
    /// cos/sin for the positions of one call.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    /// One row of floats between a fused producer (norm, gate) and the quantizer.
    row: Vec<f32>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }
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
    }
}

impl CpuBackend {
    /// cos/sin of positions `pos0..pos0 + rows` into `rope_cos`/`rope_sin` (`half` per row).
    fn rope_table(&mut self, inv_freq: &[f32], rows: usize, pos0: usize, half: usize) {
        grow(&mut self.rope_cos, rows * half);
        grow(&mut self.rope_sin, rows * half);
        for t in 0..rows {
            let (c, s) =
                (&mut self.rope_cos[t * half..(t + 1) * half], &mut self.rope_sin[t * half..(t + 1) * half]);
            ops::rope_cos_sin(pos0 + t, inv_freq, c, s);
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
    type KvCache = CpuKvCache;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload_linear(&self, w: TernaryMatrix) -> TernaryMatrix {
        w
    }
    fn upload_dense(&self, m: DenseMatrix) -> DenseMatrix {
        m
    }
    fn upload_int8(&self, m: Int8Matrix) -> Int8Matrix {
        m
    }
    fn upload_vector(&self, v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn buffer(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn quant_buffer(&self, max_rows: usize, width: usize) -> QuantizedActivations {
        QuantizedActivations::new(max_rows, width)
    }
    fn kv_cache(&self, layers: usize, max_tokens: usize, kv_dim: usize) -> CpuKvCache {
        CpuKvCache {
            keys: (0..layers).map(|_| vec![0.0; max_tokens * kv_dim]).collect(),
            values: (0..layers).map(|_| vec![0.0; max_tokens * kv_dim]).collect(),
            kv_dim,
            max_tokens,
        }
    }

    fn embedding(&mut self, table: &DenseMatrix, ids: &[u32], out: &mut Vec<f32>) {
        let w = table.cols;
        for (t, &id) in ids.iter().enumerate() {
            table.row_f32(id as usize, &mut out[t * w..(t + 1) * w]);
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
        rows: usize,
        pos0: usize,
        n_heads: usize,
        head_dim: usize,
    ) {
        let half = head_dim / 2;
        self.rope_table(inv_freq, rows, pos0, half);
        let width = n_heads * head_dim;
        for (t, row) in x[..rows * width].chunks_exact_mut(width).enumerate() {
            let (c, s) = (&self.rope_cos[t * half..(t + 1) * half], &self.rope_sin[t * half..(t + 1) * half]);
            ops::rope_neox(row, head_dim, c, s);
        }
    }

    fn rope_kv_store(
        &mut self,
        cache: &mut CpuKvCache,
        layer: usize,
        pos0: usize,
        rows: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        inv_freq: &Vec<f32>,
        head_dim: usize,
    ) {
        let (d, half) = (cache.kv_dim, head_dim / 2);
        self.rope_table(inv_freq, rows, pos0, half);
        let keys = &mut cache.keys[layer][pos0 * d..(pos0 + rows) * d];
        for (t, (dst, src)) in keys.chunks_exact_mut(d).zip(k.chunks_exact(d)).enumerate() {
            let (c, s) = (&self.rope_cos[t * half..(t + 1) * half], &self.rope_sin[t * half..(t + 1) * half]);
            ops::rope_neox_into(src, head_dim, c, s, dst);
        }
        cache.values[layer][pos0 * d..(pos0 + rows) * d].copy_from_slice(&v[..rows * d]);
    }

    fn attention(
        &mut self,
        q: &Vec<f32>,
        cache: &CpuKvCache,
        layer: usize,
        s: AttentionShape,
        out: &mut Vec<f32>,
    ) {
        let a = Attention {
            q,
            keys: &cache.keys[layer],
            values: &cache.values[layer],
            kv_dim: cache.kv_dim,
            rows: s.rows,
            pos0: s.pos0,
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            head_dim: s.head_dim,
        };
        // A decoded token's attention over a short context is tens of microseconds: on the
        // calling thread it costs no fork-join, which under load can wait a whole scheduler
        // slice for a preempted helper.
        let workers =
            if a.work() < ATTENTION_PARALLEL_MIN { 1 } else { bitnet_core::threads::parallel_threads() };
        a.run(Kernel::detect(s.head_dim), workers, &mut self.scratch, out);
    }

    fn gate(&mut self, act: Activation, gate: &Vec<f32>, up: &Vec<f32>, len: usize, out: &mut Vec<f32>) {
        gated(act, &gate[..len], &up[..len], &mut out[..len]);
    }

    fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) {
        ops::add_assign(&mut x[..len], &y[..len]);
    }

    fn lm_head(&mut self, w: &DenseMatrix, x: &Vec<f32>, first: usize, rows: usize, out: &mut Vec<f32>) {
        w.matmul(&x[first * w.cols..(first + rows) * w.cols], rows, &mut out[..rows * w.rows]);
    }

    fn read(&mut self, b: &Vec<f32>, offset: usize, out: &mut [f32]) {
        out.copy_from_slice(&b[offset..offset + out.len()]);
    }
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
        let (head_dim, kv_heads, rows, pos0) = (16, 2, 3, 4);
        let d = head_dim * kv_heads;
        let inv_freq = ops::rope_inv_freq(10_000.0, head_dim);
        let (k, v) = (data(rows * d, 5), data(rows * d, 6));
        let mut cache = b.kv_cache(2, 8, d);
        b.rope_kv_store(&mut cache, 1, pos0, rows, &k, &v, &inv_freq, head_dim);
        let mut rotated = k.clone();
        b.rope(&mut rotated, &inv_freq, rows, pos0, kv_heads, head_dim);
        assert_eq!(&cache.keys[1][pos0 * d..(pos0 + rows) * d], &rotated[..]);
        assert_eq!(&cache.values[1][pos0 * d..(pos0 + rows) * d], &v[..]);
        assert!(cache.keys[0].iter().all(|&x| x == 0.0));
    }
}
