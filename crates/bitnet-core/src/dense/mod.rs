//! Row-major float matrices kept in the dtype they were stored in (embeddings, lm_head).
//!
//! bf16 and f16 widen to f32 exactly, so computing from the narrow copy gives the same
//! numbers as widening the whole matrix first, at half the memory traffic.
//!
//! # The product
//!
//! [`DenseMatrix::matmul`] is a float linear layer over a batch of tokens. Each output is one
//! dot product of a weight row and a token, summed in an order that depends on the kernel and
//! never on the other tokens of the call: a sequence decoded in a batch gets, bit for bit, the
//! logits it gets alone. For speed the kernels compute the dot products of one weight row with a
//! tile of tokens together, so that each weight is loaded and widened once per tile, and a block
//! of rows stays in L2 while the tiles pass over it, so that the weights come from memory once
//! per call however many tokens there are. The summation orders:
//!
//! * [`FloatKernel::Portable`] (the reference, [`dot_widen`]) and [`FloatKernel::Neon`]: eight
//!   partial sums, the `j`-th taking columns `8i + j` (a multiply, then an add), added in order,
//!   then the columns past the last multiple of eight one by one.
//! * [`FloatKernel::Avx2`] and [`FloatKernel::Avx512`] (the same bits; see [`x86`]): fused
//!   multiply-adds into four 8-lane partial sums over 32 columns (bf16) or two over 16 (f16);
//!   f32 weights take the portable order.

use std::ops::Range;

use half::{bf16, f16};
use rayon::prelude::*;

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

#[derive(Clone, Debug)]
pub enum DenseData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A `[rows, cols]` float matrix.
#[derive(Clone, Debug)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: DenseData,
}

/// The instruction sets [`DenseMatrix::matmul_with`] can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatKernel {
    /// Plain Rust, the definition: multiply, then add, into eight partial sums.
    Portable,
    /// AVX2, FMA and F16C: fused multiply-adds for bf16 and f16 weights.
    Avx2,
    /// AVX-512 F on top of those: the AVX2 kernel's 8-lane partial sums two to a register, so
    /// the same bits with half the instructions.
    Avx512,
    /// aarch64 NEON: the portable kernel's operations, so its bits.
    Neon,
}

impl FloatKernel {
    pub const ALL: [FloatKernel; 4] =
        [FloatKernel::Portable, FloatKernel::Avx2, FloatKernel::Avx512, FloatKernel::Neon];

    /// Whether this CPU runs the kernel.
    pub fn is_available(self) -> bool {
        match self {
            FloatKernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            FloatKernel::Avx2 => x86::avx2_available(),
            #[cfg(target_arch = "x86_64")]
            FloatKernel::Avx512 => x86::avx2_available() && std::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            FloatKernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> FloatKernel {
        [FloatKernel::Avx512, FloatKernel::Avx2, FloatKernel::Neon]
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(FloatKernel::Portable)
    }
}

/// Rows per parallel task: big enough to amortize scheduling.
const ROWS_PER_TASK: usize = 256;

/// Bytes of weights in a block of rows that every tile of tokens runs over before the next
/// block: small enough to stay in L2 while the tiles pass.
const BLOCK_BYTES: usize = 256 << 10;

/// Tokens whose dot products with a row are computed together, sharing each load and widening
/// of its weights. Their activations (40 KB at 2560 columns) and the row stay in a 48 KB L1
/// while the row's products run; eight tokens spilled them to L2 and ran slower.
const TOKEN_TILE: usize = 4;

impl DenseMatrix {
    pub fn bytes(&self) -> usize {
        match &self.data {
            DenseData::F32(v) => v.len() * 4,
            DenseData::Bf16(v) => v.len() * 2,
            DenseData::F16(v) => v.len() * 2,
        }
    }

    /// Writes row `r` widened to f32 into `out` (`cols` long).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            DenseData::F32(v) => out.copy_from_slice(&v[range]),
            DenseData::Bf16(v) => out.iter_mut().zip(&v[range]).for_each(|(o, &w)| *o = bf16_to_f32(w)),
            DenseData::F16(v) => out.iter_mut().zip(&v[range]).for_each(|(o, w)| *o = w.to_f32()),
        }
    }

    /// The whole matrix widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_f32(r, row);
        }
        out
    }

    /// `out[t, r] = Σ_c x[t, c] · W[r, c]` for `tokens` rows of `x`: a float linear layer, on
    /// the fastest kernel of this CPU (see the module's documentation for the summation
    /// order). Nothing is allocated.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) {
        self.matmul_with(FloatKernel::best(), x, tokens, out)
    }

    /// [`DenseMatrix::matmul`] on a chosen kernel (the best one if this CPU cannot run it).
    ///
    /// Threads split the weight rows into tasks; a task runs every tile of tokens over a block
    /// of its rows before the next block, so the weights are read from memory once per call,
    /// and each value is the same dot product whatever the number of tokens.
    pub fn matmul_with(&self, kernel: FloatKernel, x: &[f32], tokens: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= tokens * cols && out.len() >= tokens * rows);
        let kernel = if kernel.is_available() { kernel } else { FloatKernel::best() };
        let row_bytes = self.bytes() / rows.max(1);
        let block_rows = (BLOCK_BYTES / row_bytes.max(1)).clamp(1, ROWS_PER_TASK);
        let tiles = tokens.div_ceil(TOKEN_TILE);
        let out = SharedRows(out.as_mut_ptr());
        let task = |b: usize| {
            let task_rows = b * ROWS_PER_TASK..((b + 1) * ROWS_PER_TASK).min(rows);
            for r0 in task_rows.clone().step_by(block_rows) {
                let block = r0..(r0 + block_rows).min(task_rows.end);
                // The rows after this block, fetched while its tiles run (the hardware
                // prefetcher alone fetches them only when the first tile reaches them, and the
                // core then waits for memory while the later tiles would have had work).
                let next = block.end * row_bytes..((block.end + block.len()).min(rows)) * row_bytes;
                let ahead = Ahead { bytes: &self.as_bytes()[next], steps: tiles * block.len() };
                let mut t0 = 0;
                while t0 < tokens {
                    let n = (tokens - t0).min(TOKEN_TILE);
                    let tile = t0 / TOKEN_TILE;
                    self.block_tile(kernel, block.clone(), (&ahead, tile * block.len()), x, t0, n, &out);
                    t0 += n;
                }
            }
        };
        let tasks = rows.div_ceil(ROWS_PER_TASK);
        if crate::threads::parallel_threads() == 1 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    }

    /// The weights as bytes.
    fn as_bytes(&self) -> &[u8] {
        let (ptr, len) = match &self.data {
            DenseData::F32(v) => (v.as_ptr().cast::<u8>(), v.len() * 4),
            DenseData::Bf16(v) => (v.as_ptr().cast::<u8>(), v.len() * 2),
            DenseData::F16(v) => (v.as_ptr().cast::<u8>(), v.len() * 2),
        };
        // SAFETY: the vector's elements are plain numbers, `len` bytes of them.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }

    /// Rows `rows` for tokens `t0..t0 + n` (`n` at most [`TOKEN_TILE`]); `ahead.1` is
    /// the first row's step in `ahead.0`.
    #[allow(clippy::too_many_arguments)]
    fn block_tile(
        &self,
        kernel: FloatKernel,
        rows: Range<usize>,
        ahead: (&Ahead, usize),
        x: &[f32],
        t0: usize,
        n: usize,
        out: &SharedRows,
    ) {
        match n {
            4 => self.block_tile_n::<4>(kernel, rows, ahead, x, t0, out),
            3 => self.block_tile_n::<3>(kernel, rows, ahead, x, t0, out),
            2 => self.block_tile_n::<2>(kernel, rows, ahead, x, t0, out),
            _ => self.block_tile_n::<1>(kernel, rows, ahead, x, t0, out),
        }
    }

    fn block_tile_n<const N: usize>(
        &self,
        kernel: FloatKernel,
        rows: Range<usize>,
        (ahead, first_step): (&Ahead, usize),
        x: &[f32],
        t0: usize,
        out: &SharedRows,
    ) {
        const { assert!(N >= 1 && N <= TOKEN_TILE) };
        let cols = self.cols;
        let xs: [&[f32]; N] = std::array::from_fn(|i| &x[(t0 + i) * cols..(t0 + i + 1) * cols]);
        let mut r = rows.start;
        while r < rows.end {
            let dots = if r + 2 <= rows.end {
                ahead.fetch(first_step + r - rows.start);
                ahead.fetch(first_step + r + 1 - rows.start);
                let [a, b] = self.pair_dots(kernel, r, &xs);
                [Some(a), Some(b)]
            } else {
                ahead.fetch(first_step + r - rows.start);
                [Some(self.row_dots(kernel, r, &xs)), None]
            };
            for (k, dots) in dots.into_iter().flatten().enumerate() {
                for (i, d) in dots.into_iter().enumerate() {
                    // SAFETY: out holds tokens × rows values (asserted by `matmul_with`); only
                    // the task that owns row `r + k` writes it, for every token.
                    unsafe { *out.get().add((t0 + i) * self.rows + r + k) = d };
                }
            }
            r += 2;
        }
    }

    /// The dot products of rows `r` and `r + 1` with the `N` tokens `xs`: together where the
    /// kernel has the registers for both (AVX-512 bf16 and f16: each token load then serves
    /// two rows), else one row after the other.
    #[inline]
    fn pair_dots<const N: usize>(&self, kernel: FloatKernel, r: usize, xs: &[&[f32]; N]) -> [[f32; N]; 2] {
        #[cfg(target_arch = "x86_64")]
        let pair = |r: usize| [r * self.cols..(r + 1) * self.cols, (r + 1) * self.cols..(r + 2) * self.cols];
        match (&self.data, kernel) {
            // SAFETY (both arms): `matmul_with` runs only available kernels; rows and tokens
            // are `cols` long.
            #[cfg(target_arch = "x86_64")]
            (DenseData::Bf16(v), FloatKernel::Avx512) => unsafe {
                x86::dots_bf16_avx512(&pair(r).map(|range| &v[range]), xs)
            },
            #[cfg(target_arch = "x86_64")]
            (DenseData::F16(v), FloatKernel::Avx512) => unsafe {
                x86::dots_f16_avx512(&pair(r).map(|range| &v[range]), xs)
            },
            _ => [self.row_dots(kernel, r, xs), self.row_dots(kernel, r + 1, xs)],
        }
    }

    /// The dot products of row `r` with each of the `N` tokens `xs` (each `cols` long), on an
    /// available `kernel`.
    #[inline]
    fn row_dots<const N: usize>(&self, kernel: FloatKernel, r: usize, xs: &[&[f32]; N]) -> [f32; N] {
        let range = r * self.cols..(r + 1) * self.cols;
        match (&self.data, kernel) {
            // SAFETY (x86 arms): `matmul_with` runs only available kernels, and Avx512 implies
            // Avx2; every token is `cols` long.
            #[cfg(target_arch = "x86_64")]
            (DenseData::Bf16(v), FloatKernel::Avx512) => unsafe {
                x86::dots_bf16_avx512(&[&v[range]], xs)[0]
            },
            #[cfg(target_arch = "x86_64")]
            (DenseData::Bf16(v), FloatKernel::Avx2) => unsafe { x86::dots_bf16_avx2(&v[range], xs) },
            #[cfg(target_arch = "x86_64")]
            (DenseData::F16(v), FloatKernel::Avx512) => unsafe { x86::dots_f16_avx512(&[&v[range]], xs)[0] },
            #[cfg(target_arch = "x86_64")]
            (DenseData::F16(v), FloatKernel::Avx2) => unsafe { x86::dots_f16_avx2(&v[range], xs) },
            #[cfg(target_arch = "x86_64")]
            (DenseData::F32(v), FloatKernel::Avx2 | FloatKernel::Avx512) => unsafe {
                x86::dots_f32_avx2(&v[range], xs)
            },
            // SAFETY (NEON arms): NEON is available; every token is `cols` long.
            #[cfg(target_arch = "aarch64")]
            (DenseData::Bf16(v), FloatKernel::Neon) => unsafe { neon::dots_bf16(&v[range], xs) },
            #[cfg(target_arch = "aarch64")]
            (DenseData::F32(v), FloatKernel::Neon) => unsafe { neon::dots_f32(&v[range], xs) },
            (DenseData::F32(v), _) => dots_widen(&v[range], xs, |w| w),
            (DenseData::Bf16(v), _) => dots_widen(&v[range], xs, bf16_to_f32),
            (DenseData::F16(v), _) => dots_widen(&v[range], xs, |w| w.to_f32()),
        }
    }
}

/// Weights to bring into the cache over `steps` row computations, an even share at each
/// (x86-64 only: elsewhere the hardware prefetcher alone).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Ahead<'a> {
    bytes: &'a [u8],
    steps: usize,
}

impl Ahead<'_> {
    /// Prefetches step `i`'s share of the bytes into L2.
    #[inline]
    fn fetch(&self, i: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let share = |i: usize| i * self.bytes.len() / self.steps.max(1);
            for at in (share(i)..share(i + 1)).step_by(64) {
                // SAFETY: SSE is part of x86-64; `at` is inside the slice, and a prefetch
                // never faults.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                        self.bytes.as_ptr().add(at).cast(),
                    )
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = i;
    }
}

/// The output of [`DenseMatrix::matmul`], written by tasks at disjoint rows.
struct SharedRows(*mut f32);
// SAFETY: tasks write disjoint rows through it (see `DenseMatrix::matmul_with`).
unsafe impl Sync for SharedRows {}
unsafe impl Send for SharedRows {}

impl SharedRows {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// bf16 → f32 is a shift of the bits (NaN payloads included), which vectorizes; `half`'s
/// conversion checks for NaN first and does not.
#[inline(always)]
fn bf16_to_f32(w: bf16) -> f32 {
    f32::from_bits((w.to_bits() as u32) << 16)
}

/// Dot product of a narrow-float row and an f32 vector, widening on the fly: the definition of
/// the portable order. Eight partial sums, the `j`-th over columns `8i + j`, added in order,
/// then the columns past the last multiple of eight.
#[inline]
pub fn dot_widen<T: Copy>(a: &[T], b: &[f32], widen: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for j in 0..8 {
            acc[j] += widen(a[i * 8 + j]) * b[i * 8 + j];
        }
    }
    let mut s = 0.0f32;
    for i in chunks * 8..a.len() {
        s += widen(a[i]) * b[i];
    }
    acc.iter().sum::<f32>() + s
}

/// [`dot_widen`] of one row with `N` tokens at once, each widened weight used `N` times: the
/// same operations, in the same order, for every token.
#[inline]
fn dots_widen<T: Copy, const N: usize>(a: &[T], xs: &[&[f32]; N], widen: impl Fn(T) -> f32) -> [f32; N] {
    let mut acc = [[0.0f32; 8]; N];
    let chunks = a.len() / 8;
    let xs: [&[f32]; N] = std::array::from_fn(|t| &xs[t][..a.len()]);
    for i in 0..chunks {
        let w: [f32; 8] = std::array::from_fn(|j| widen(a[i * 8 + j]));
        for (acc, x) in acc.iter_mut().zip(&xs) {
            let x = &x[i * 8..i * 8 + 8];
            for j in 0..8 {
                acc[j] += w[j] * x[j];
            }
        }
    }
    std::array::from_fn(|t| {
        let mut s = 0.0f32;
        for i in chunks * 8..a.len() {
            s += widen(a[i]) * xs[t][i];
        }
        acc[t].iter().sum::<f32>() + s
    })
}

/// f32 dot product in the portable order ([`dot_widen`]), which the compiler vectorizes.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_widen(a, b, |w| w)
}

#[cfg(test)]
mod tests;
