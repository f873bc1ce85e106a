//! Q8_0, Q6_K, Q4_K, Q4_0 and Q4_1 weights laid out rows-in-lanes, for x86 CPUs (AVX-512 VNNI,
//! or AVX2).
//!
//! Q8_0 ([`Q8Lanes`]) first; Q6_K ([`Q6Lanes`]) follows the same plan with its codes a byte each,
//! Q4_K ([`Q4Lanes`]), Q4_0 ([`Q40Lanes`]) and Q4_1 ([`Q41Lanes`]) with their codes two to a
//! byte (eight columns of a row in a 32-bit lane).
//!
//! The stored Q8_0 layout puts each row's blocks one after another, so a SIMD kernel that gives
//! each of eight rows an accumulator lane reads eight memory streams and reduces eight vectors
//! per block to get the eight block sums (crates/bitnet-quant/KERNELS.md; on a Zen 4 core the
//! 2B-4T head in that form ran at 34 GB/s from memory and only 42 GB/s from cache, against
//! 52 GB/s for the int8 head). Here sixteen rows are interleaved four columns at a time:
//!
//! ```text
//! group g (rows 16g .. 16g + 15), block b (columns 32b .. 32b + 31), 544 bytes:
//!   16 × f16    the rows' block scales d, row i at 2i
//!   8 chunks j  64 bytes each: for row i, its codes of columns 32b + 4j .. + 3 at 4i
//! ```
//!
//! so one `vpdpbusd` multiplies four columns of all sixteen rows by the same four activations
//! (broadcast) and adds them into each row's own lane: a block's sixteen sums come from eight
//! of them, no reduction, one memory stream per group, and the same 34 bytes per 32 weights.
//! `vpdpbusd` takes unsigned bytes on one side, so the activations go in offset by 128
//! (`x + 128`, from `x ^ 0x80`) and `128 · Σ w` — eight more `vpdpbusd` of the codes against
//! ones — comes off: `Σ (x + 128) w − 128 Σ w = Σ x w`, exact in i32. Without VNNI (AVX2), each
//! half group of eight rows takes `vpmaddubsw` of the activations' magnitudes with the codes
//! carrying the activations' signs (or, for a matrix with a −128 code, the codes' magnitudes
//! with the activations carrying the codes' signs), then `vpmaddwd` with ones: the same sums,
//! still without a reduction.
//!
//! The products are [`super::scalar::dot_q8_0`]'s, in its order: each block's exact integer,
//! then `acc += (d_w · d_a) · isum` block after block, so every path here (scalar, AVX2,
//! AVX-512 VNNI) gives the stored matrix's outputs bit for bit. Rows past the matrix in the last
//! group are zero codes and zero scales, and are not written.

use std::marker::PhantomData;
use std::ops::Range;

use super::{
    check_product, parallel_min, scalar, ActivationKind, DenseActivations, DenseError, DenseFormat,
    DenseLinear, QK, QK_K,
};
use crate::aligned::AlignedBytes;
use crate::kernels::{for_ranges, KernelPath, SharedOut};

/// Rows of a group: one per lane of a 16-lane vector.
pub const LANES: usize = 16;
/// Columns of a row that share a 32-bit lane (one `vpdpbusd` step).
const CHUNK: usize = 4;
/// Bytes of one Q8_0 block of one group: the sixteen scales, then the codes.
const BLOCK_BYTES: usize = 2 * LANES + QK * LANES;
/// Bytes of one Q6_K super-block of one group: the sixteen `d`, the 16 × 16 sub-block scales,
/// then the codes.
const Q6_BLOCK_BYTES: usize = Q6_CODES + QK_K * LANES;
/// Sub-blocks of a Q6_K super-block (sixteen columns each, one scale each).
const Q6_SUBS: usize = QK_K / 16;
/// Where the codes of a Q6_K super-block start.
const Q6_CODES: usize = 2 * LANES + Q6_SUBS * LANES;
/// Sub-blocks of a Q4_K super-block (32 columns each, a scale and a min each).
const Q4_SUBS: usize = QK_K / 32;
/// Where a Q4_K group block's `dmin`, sub-block scales, mins and codes start.
const Q4_DMIN: usize = 2 * LANES;
const Q4_SCALES: usize = 4 * LANES;
const Q4_MINS: usize = Q4_SCALES + Q4_SUBS * LANES;
const Q4_CODES: usize = Q4_MINS + Q4_SUBS * LANES;
/// Where a Q4_0 / Q4_1 group block's codes start: after the sixteen `d` (and Q4_1's sixteen
/// `m`); the block is 32 columns, four 64-byte chunks of nibbles.
const Q40_CODES: usize = 2 * LANES;
const Q41_CODES: usize = 4 * LANES;
/// Bytes of one Q4_K super-block of one group: `d`, `dmin`, the scales and mins a byte each,
/// then the codes two to a byte.
const Q4_BLOCK_BYTES: usize = Q4_CODES + QK_K * LANES / 2;
/// How far behind the copy a shared source's rows are released (see [`Lanes::from_stored`]).
const RELEASE_LAG: usize = 1 << 20;

/// Offset in a group's block of lane `i`'s code of column `c` (codes from `codes` on, four
/// columns of each of the sixteen rows at a time).
fn code_at(codes: usize, i: usize, c: usize) -> usize {
    codes + (c / CHUNK) * LANES * CHUNK + i * CHUNK + c % CHUNK
}

/// Where lane `i`'s Q4_K code of column `c` is in a group's block: the byte and the shift of
/// its nibble. Each 64-byte chunk holds eight columns of the sixteen rows: for row `i` at
/// `4i .. 4i + 3`, columns `8k .. 8k + 3` of a sub-block in the low nibbles and `8k + 4 .. 8k + 7`
/// in the high ones, so one mask or one shift and mask gives a `vpdpbusd` operand.
fn nibble_at(i: usize, c: usize) -> (usize, u32) {
    nibble_from(Q4_CODES, i, c)
}

/// [`nibble_at`] for codes that start at `codes`.
fn nibble_from(codes: usize, i: usize, c: usize) -> (usize, u32) {
    let (chunk, within) = (c / 8, c % 8);
    (codes + chunk * LANES * CHUNK + i * CHUNK + within % CHUNK, 4 * (within / CHUNK) as u32)
}

/// What a stored format needs to be laid out rows-in-lanes: its block's shape, how a stored
/// block goes into a lane, the scalar definition of a lane's term, and its SIMD kernels.
pub(crate) trait LaneFormat: Sized {
    const FORMAT: DenseFormat;
    const ACTIVATIONS: ActivationKind;
    /// Columns of a block, bytes of a stored block, bytes of a group's block here.
    const BLOCK_COLS: usize;
    const STORED_BYTES: usize;
    const LANE_BYTES: usize;
    /// Writes stored block `stored` into lane `i` of a group's block `dst`.
    fn put(stored: &[u8], i: usize, dst: &mut [u8]);
    /// Lane `i`'s values of a group's block, as the stored block decodes them.
    fn decode(block: &[u8], i: usize, out: &mut [f32]);
    /// Lane `i`'s terms of a block against the block's activations `x` (scale `d_a`, sums of
    /// sixteen `sums`): the scalar definition's integer, then `(d_w · d_a) · isum`; and what the
    /// format subtracts once at the end (Q4_K's mins, `(dmin · d_a) · msum`; zero for the
    /// others), kept apart as the stored product keeps it.
    fn term(block: &[u8], i: usize, x: &[i8], d_a: f32, sums: &[i32]) -> (f32, f32);
    /// A second subtracted term from the block's Q8_1 scaled sum `f16(d_a · Σ x)` (Q4_1's mins;
    /// zero for the others).
    fn min_term(_block: &[u8], _i: usize, _scaled_sum: f32) -> f32 {
        0.0
    }
    /// Whether stored block `stored` holds a code that a kernel cannot negate in its bytes
    /// (Q8_0's −128, which llama.cpp's and this crate's quantizers never write); false for
    /// formats whose kernels never negate codes.
    fn has_unnegatable_code(_stored: &[u8]) -> bool {
        false
    }
    /// The SIMD kernel `kernel` over `groups` (never called with [`Kernel::Scalar`]).
    fn run_simd(
        kernel: Kernel,
        w: &Lanes<Self>,
        a: &DenseActivations,
        groups: Range<usize>,
        out: &SharedOut<'_, f32>,
    );
}

/// Q8_0 (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct Q8;

/// Q6_K: per group and 256-column super-block the rows' `d` (f16), their sub-block scales
/// (sub-block `s` of row `i` at `s · 16 + i`), then the codes as unsigned bytes `q ∈ 0..64`
/// (the stored value is `q − 32`). A byte a code instead of six bits (1.07 bytes a weight
/// against 0.82) makes every `vpdpbusd` a plain load, with no unpacking of the stored bit planes
/// per token. The integers are `ggml_vec_dot_q6_K_q8_K`'s: per sub-block `Σ q x − 32 Σ x` (the
/// activation sums of sixteen), times its scale, summed over the super-block.
#[derive(Clone, Copy, Debug)]
pub struct Q6;

impl LaneFormat for Q8 {
    const FORMAT: DenseFormat = DenseFormat::Q8_0;
    const ACTIVATIONS: ActivationKind = ActivationKind::Q8Blocks;
    const BLOCK_COLS: usize = QK;
    const STORED_BYTES: usize = 34;
    const LANE_BYTES: usize = BLOCK_BYTES;

    fn put(stored: &[u8], i: usize, dst: &mut [u8]) {
        dst[2 * i..2 * i + 2].copy_from_slice(&stored[..2]);
        for c in 0..QK {
            dst[code_at(2 * LANES, i, c)] = stored[2 + c];
        }
    }

    fn decode(block: &[u8], i: usize, out: &mut [f32]) {
        let d = scalar::f16_at(block, 2 * i);
        for (c, v) in out.iter_mut().enumerate().take(QK) {
            *v = f32::from(block[code_at(2 * LANES, i, c)] as i8) * d;
        }
    }

    fn term(block: &[u8], i: usize, x: &[i8], d_a: f32, _sums: &[i32]) -> (f32, f32) {
        let isum: i32 =
            (0..QK).map(|c| i32::from(block[code_at(2 * LANES, i, c)] as i8) * i32::from(x[c])).sum();
        ((scalar::f16_at(block, 2 * i) * d_a) * isum as f32, 0.0)
    }

    fn has_unnegatable_code(stored: &[u8]) -> bool {
        stored[2..2 + QK].contains(&0x80)
    }

    // Off x86 only the scalar definition runs, and this is never called.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn run_simd(
        kernel: Kernel,
        w: &Lanes<Q8>,
        a: &DenseActivations,
        groups: Range<usize>,
        out: &SharedOut<'_, f32>,
    ) {
        match kernel {
            // SAFETY (both arms): `Kernel::of` checked the CPU's features; the kernels read
            // inside the groups and tokens they are given.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx512::run_groups(w, a, groups, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::run_groups(w, a, groups, out) },
            _ => unreachable!("the scalar definition is Lanes::run_groups_scalar"),
        }
    }
}

impl LaneFormat for Q6 {
    const FORMAT: DenseFormat = DenseFormat::Q6_K;
    const ACTIVATIONS: ActivationKind = ActivationKind::Q8K;
    const BLOCK_COLS: usize = QK_K;
    const STORED_BYTES: usize = 210;
    const LANE_BYTES: usize = Q6_BLOCK_BYTES;

    fn put(stored: &[u8], i: usize, dst: &mut [u8]) {
        dst[2 * i..2 * i + 2].copy_from_slice(&stored[208..210]);
        for s in 0..Q6_SUBS {
            dst[2 * LANES + s * LANES + i] = stored[192 + s];
        }
        for c in 0..QK_K {
            dst[code_at(Q6_CODES, i, c)] = scalar::q6_k_value(stored, c);
        }
    }

    fn decode(block: &[u8], i: usize, out: &mut [f32]) {
        let d = scalar::f16_at(block, 2 * i);
        for (c, v) in out.iter_mut().enumerate().take(QK_K) {
            let sc = f32::from(block[2 * LANES + (c / 16) * LANES + i] as i8);
            *v = (d * sc) * (i32::from(block[code_at(Q6_CODES, i, c)]) - 32) as f32;
        }
    }

    fn term(block: &[u8], i: usize, x: &[i8], d_a: f32, _sums: &[i32]) -> (f32, f32) {
        let mut isum = 0i32;
        for s in 0..Q6_SUBS {
            let sc = i32::from(block[2 * LANES + s * LANES + i] as i8);
            let part: i32 = (16 * s..16 * s + 16)
                .map(|c| (i32::from(block[code_at(Q6_CODES, i, c)]) - 32) * i32::from(x[c]))
                .sum();
            isum += sc * part;
        }
        ((scalar::f16_at(block, 2 * i) * d_a) * isum as f32, 0.0)
    }

    // Off x86 only the scalar definition runs, and this is never called.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn run_simd(
        kernel: Kernel,
        w: &Lanes<Q6>,
        a: &DenseActivations,
        groups: Range<usize>,
        out: &SharedOut<'_, f32>,
    ) {
        match kernel {
            // SAFETY (both arms): as for Q8_0.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx512::run_q6_groups(w, a, groups, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::run_q6_groups(w, a, groups, out) },
            _ => unreachable!("the scalar definition is Lanes::run_groups_scalar"),
        }
    }
}

/// Q4_K: per group and 256-column super-block the rows' `d` and `dmin` (f16), their sub-block
/// scales and mins unpacked to a byte each (sub-block `s` of row `i` at `s · 16 + i`), then the
/// codes two to a byte ([`nibble_at`]): 1.16 bytes a weight's worth of 148 per row and
/// super-block against the file's 144. The integers are `ggml_vec_dot_q4_K_q8_K`'s: per
/// sub-block `Σ q x` times its scale, and the mins against the activation sums of 32.
#[derive(Clone, Copy, Debug)]
pub struct Q4;

impl LaneFormat for Q4 {
    const FORMAT: DenseFormat = DenseFormat::Q4_K;
    const ACTIVATIONS: ActivationKind = ActivationKind::Q8K;
    const BLOCK_COLS: usize = QK_K;
    const STORED_BYTES: usize = 144;
    const LANE_BYTES: usize = Q4_BLOCK_BYTES;

    fn put(stored: &[u8], i: usize, dst: &mut [u8]) {
        dst[2 * i..2 * i + 2].copy_from_slice(&stored[0..2]);
        dst[Q4_DMIN + 2 * i..Q4_DMIN + 2 * i + 2].copy_from_slice(&stored[2..4]);
        for s in 0..Q4_SUBS {
            let (sc, m) = scalar::scale_min_k4(s, &stored[4..16]);
            dst[Q4_SCALES + s * LANES + i] = sc;
            dst[Q4_MINS + s * LANES + i] = m;
        }
        for c in 0..QK_K {
            // Stored: 64-column chunks of 32 bytes, the first 32 columns low nibbles.
            let byte = stored[16 + 32 * (c / 64) + c % 32];
            let code = if c % 64 < 32 { byte & 0x0F } else { byte >> 4 };
            let (at, shift) = nibble_at(i, c);
            dst[at] |= code << shift;
        }
    }

    fn decode(block: &[u8], i: usize, out: &mut [f32]) {
        let (d, dmin) = (scalar::f16_at(block, 2 * i), scalar::f16_at(block, Q4_DMIN + 2 * i));
        for (c, v) in out.iter_mut().enumerate().take(QK_K) {
            let s = c / 32;
            let scale = d * f32::from(block[Q4_SCALES + s * LANES + i]);
            let min = dmin * f32::from(block[Q4_MINS + s * LANES + i]);
            let (at, shift) = nibble_at(i, c);
            *v = scale * f32::from((block[at] >> shift) & 0x0F) - min;
        }
    }

    fn term(block: &[u8], i: usize, x: &[i8], d_a: f32, sums: &[i32]) -> (f32, f32) {
        let (mut isum, mut msum) = (0i32, 0i32);
        for s in 0..Q4_SUBS {
            let part: i32 = (32 * s..32 * s + 32)
                .map(|c| {
                    let (at, shift) = nibble_at(i, c);
                    i32::from((block[at] >> shift) & 0x0F) * i32::from(x[c])
                })
                .sum();
            isum += i32::from(block[Q4_SCALES + s * LANES + i]) * part;
            msum += i32::from(block[Q4_MINS + s * LANES + i]) * (sums[2 * s] + sums[2 * s + 1]);
        }
        let (d, dmin) = (scalar::f16_at(block, 2 * i), scalar::f16_at(block, Q4_DMIN + 2 * i));
        ((d * d_a) * isum as f32, (dmin * d_a) * msum as f32)
    }

    // Off x86 only the scalar definition runs, and this is never called.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn run_simd(
        kernel: Kernel,
        w: &Lanes<Q4>,
        a: &DenseActivations,
        groups: Range<usize>,
        out: &SharedOut<'_, f32>,
    ) {
        match kernel {
            // SAFETY (both arms): as for Q8_0.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx512::run_q4_groups(w, a, groups, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::run_q4_groups(w, a, groups, out) },
            _ => unreachable!("the scalar definition is Lanes::run_groups_scalar"),
        }
    }
}

/// Q4_0 (`with_min = false`: the value is `d · (q − 8)`) and Q4_1 (`true`: `d · q + m`): per
/// group and 32-column block the rows' `d` (and `m`), f16, then the codes two to a byte
/// ([`nibble_from`]), the file's 18 (20) bytes a row and block. The integers are
/// `ggml_vec_dot_q4_0_q8_0`'s (`Σ q x − 8 Σ x`, the activation block sum) and
/// `ggml_vec_dot_q4_1_q8_1`'s (`Σ q x`, with `m · s_a` summed apart and added at the end).
#[derive(Clone, Copy, Debug)]
pub struct Q4Legacy<const WITH_MIN: bool>;
/// Q4_0's lane format.
pub type Q40 = Q4Legacy<false>;
/// Q4_1's lane format.
pub type Q41 = Q4Legacy<true>;

impl<const WITH_MIN: bool> Q4Legacy<WITH_MIN> {
    const CODES: usize = if WITH_MIN { Q41_CODES } else { Q40_CODES };
}

impl<const WITH_MIN: bool> LaneFormat for Q4Legacy<WITH_MIN> {
    const FORMAT: DenseFormat = if WITH_MIN { DenseFormat::Q4_1 } else { DenseFormat::Q4_0 };
    const ACTIVATIONS: ActivationKind = ActivationKind::Q8Blocks;
    const BLOCK_COLS: usize = QK;
    const STORED_BYTES: usize = if WITH_MIN { 20 } else { 18 };
    const LANE_BYTES: usize = Self::CODES + QK * LANES / 2;

    fn put(stored: &[u8], i: usize, dst: &mut [u8]) {
        dst[2 * i..2 * i + 2].copy_from_slice(&stored[0..2]);
        if WITH_MIN {
            dst[2 * LANES + 2 * i..2 * LANES + 2 * i + 2].copy_from_slice(&stored[2..4]);
        }
        let codes = &stored[Self::STORED_BYTES - QK / 2..];
        for c in 0..QK {
            // Stored: element j in the low nibble of byte j, element j + 16 in its high one.
            let code = if c < 16 { codes[c] & 0x0F } else { codes[c - 16] >> 4 };
            let (at, shift) = nibble_from(Self::CODES, i, c);
            dst[at] |= code << shift;
        }
    }

    fn decode(block: &[u8], i: usize, out: &mut [f32]) {
        let d = scalar::f16_at(block, 2 * i);
        for (c, v) in out.iter_mut().enumerate().take(QK) {
            let (at, shift) = nibble_from(Self::CODES, i, c);
            let q = (block[at] >> shift) & 0x0F;
            *v = if WITH_MIN {
                d * f32::from(q) + scalar::f16_at(block, 2 * LANES + 2 * i)
            } else {
                (i32::from(q) - 8) as f32 * d
            };
        }
    }

    fn term(block: &[u8], i: usize, x: &[i8], d_a: f32, _sums: &[i32]) -> (f32, f32) {
        let isum: i32 = (0..QK)
            .map(|c| {
                let (at, shift) = nibble_from(Self::CODES, i, c);
                let q = i32::from((block[at] >> shift) & 0x0F);
                (if WITH_MIN { q } else { q - 8 }) * i32::from(x[c])
            })
            .sum();
        ((scalar::f16_at(block, 2 * i) * d_a) * isum as f32, 0.0)
    }

    /// Q4_1's `m · s_a`, negated: the generic definition subtracts what comes second, and a
    /// sum of negated terms is the negated sum, bit for bit (rounding to nearest is symmetric).
    fn min_term(block: &[u8], i: usize, scaled_sum: f32) -> f32 {
        if WITH_MIN {
            -(scalar::f16_at(block, 2 * LANES + 2 * i) * scaled_sum)
        } else {
            0.0
        }
    }

    // Off x86 only the scalar definition runs, and this is never called.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn run_simd(
        kernel: Kernel,
        w: &Lanes<Self>,
        a: &DenseActivations,
        groups: Range<usize>,
        out: &SharedOut<'_, f32>,
    ) {
        match kernel {
            // SAFETY (both arms): as for Q8_0.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx512::run_q4_legacy_groups(w, a, groups, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::run_q4_legacy_groups(w, a, groups, out) },
            _ => unreachable!("the scalar definition is Lanes::run_groups_scalar"),
        }
    }
}

/// A matrix of format `F` laid out rows-in-lanes: groups of sixteen rows, each block of the
/// group's rows one after another (see the module documentation).
#[derive(Clone, Debug)]
pub struct Lanes<F> {
    rows: usize,
    cols: usize,
    data: AlignedBytes,
    /// Some block holds a code the faster AVX2 Q8_0 kernel cannot negate (−128): the AVX2
    /// kernel then takes the codes' magnitudes instead (one more instruction a vector).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    unnegatable: bool,
    format: PhantomData<fn() -> F>,
}

/// Q8_0 rows-in-lanes.
pub type Q8Lanes = Lanes<Q8>;
/// Q6_K rows-in-lanes.
pub type Q6Lanes = Lanes<Q6>;
/// Q4_K rows-in-lanes.
pub type Q4Lanes = Lanes<Q4>;
/// Q4_0 rows-in-lanes.
pub type Q40Lanes = Lanes<Q40>;
/// Q4_1 rows-in-lanes.
pub type Q41Lanes = Lanes<Q41>;

// The bound is this crate's own trait: the formats are the aliases above; the
// trait's kernels take crate-private types, so it is not for other crates to implement.
#[allow(private_bounds)]
impl<F: LaneFormat> Lanes<F> {
    /// Whether [`Lanes::from_stored`] pays for `w` on `path`: `F`'s format on its integer
    /// activations, with at least a group of rows, where `path` has a kernel for this layout
    /// (AVX-512 VNNI, or AVX2 on the other x86 paths).
    pub fn suits(w: &DenseLinear, path: KernelPath) -> bool {
        w.format() == F::FORMAT
            && !w.float_activations()
            && w.rows() >= LANES
            && Kernel::of(path) != Kernel::Scalar
    }

    /// `w` in this layout; `None` for another format or for a matrix set to run on f32
    /// activations. A matrix reading a checkpoint's mapping has its source rows released behind
    /// the copy, so the two are never both resident whole.
    pub fn from_stored(w: &DenseLinear) -> Option<Self> {
        if w.format() != F::FORMAT || w.float_activations() {
            return None;
        }
        let (rows, cols) = (w.rows(), w.cols());
        let blocks = cols / F::BLOCK_COLS;
        let groups = rows.div_ceil(LANES);
        let mut data = AlignedBytes::zeroed(groups * blocks * F::LANE_BYTES);
        let out = data.as_bytes_mut();
        // Source rows handed back so far. A read fault maps in the neighbouring cached pages of
        // its aligned window too (the kernel's fault-around), so rows are released only once the
        // copy is RELEASE_LAG bytes past them, and everything once more at the end.
        let (mut released, lag_rows) = (0, RELEASE_LAG.div_ceil(w.row_bytes().max(1)));
        let mut unnegatable = false;
        for g in 0..groups {
            let live = (rows - g * LANES).min(LANES);
            for i in 0..live {
                let src = w.row(g * LANES + i);
                for b in 0..blocks {
                    let dst = (g * blocks + b) * F::LANE_BYTES;
                    let stored = &src[b * F::STORED_BYTES..(b + 1) * F::STORED_BYTES];
                    unnegatable |= F::has_unnegatable_code(stored);
                    F::put(stored, i, &mut out[dst..dst + F::LANE_BYTES]);
                }
            }
            let behind = (g * LANES + live).saturating_sub(lag_rows);
            if behind >= released + lag_rows {
                w.release_rows(released..behind);
                released = behind;
            }
        }
        w.release();
        Some(Self { rows, cols, data, unnegatable, format: PhantomData })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The activation encoding [`Lanes::forward_quantized`] takes (`F`'s integer blocks).
    pub fn activation_kind(&self) -> ActivationKind {
        F::ACTIVATIONS
    }
    /// Bytes the weights take (what a product streams), the padding rows of the last group
    /// included.
    pub fn bytes(&self) -> usize {
        self.data.as_bytes().len()
    }

    /// Every block of group `g`, one after another.
    fn group(&self, g: usize) -> &[u8] {
        let len = self.cols / F::BLOCK_COLS * F::LANE_BYTES;
        &self.data.as_bytes()[g * len..(g + 1) * len]
    }

    /// Row `r` decoded to f32 into `out[..cols]`, as [`DenseLinear::dequantize_row`] decodes the
    /// stored row.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), DenseError> {
        if r >= self.rows {
            return Err(DenseError::RowOutOfRange { row: r, rows: self.rows });
        }
        if out.len() < self.cols {
            return Err(DenseError::RowBuffer { cols: self.cols, got: out.len() });
        }
        let blocks = self.group(r / LANES).chunks_exact(F::LANE_BYTES);
        for (block, o) in blocks.zip(out[..self.cols].chunks_exact_mut(F::BLOCK_COLS)) {
            F::decode(block, r % LANES, o);
        }
        Ok(())
    }

    /// `out[t, r] = Σ_c W[r, c] · x[t, c]` for the tokens of `a` (quantized as `F` takes them),
    /// on the active kernel path.
    pub fn forward_quantized(&self, a: &DenseActivations, out: &mut [f32]) -> Result<(), DenseError> {
        self.forward_quantized_with(KernelPath::active(), a, out)
    }

    /// [`Lanes::forward_quantized`] on a chosen path: AVX-512 VNNI for that path, AVX2 for the
    /// other x86 SIMD paths, the scalar definition otherwise (same bits on all three).
    pub fn forward_quantized_with(
        &self,
        path: KernelPath,
        a: &DenseActivations,
        out: &mut [f32],
    ) -> Result<(), DenseError> {
        check_product(F::FORMAT, F::ACTIVATIONS, self.rows, self.cols, a, out.len())?;
        let kernel = Kernel::of(path.or_best());
        let sink = SharedOut::new(out, self.rows);
        let groups = self.rows.div_ceil(LANES);
        for_ranges(groups, a.m() * self.rows * self.cols, parallel_min(a.m()), |range| match kernel {
            Kernel::Scalar => self.run_groups_scalar(a, range, &sink),
            simd => F::run_simd(simd, self, a, range, &sink),
        });
        Ok(())
    }

    /// The definition: each live row of `groups` against each token, block by block,
    /// `acc += term` in block order (and the subtracted terms apart, taken off at the end).
    fn run_groups_scalar(&self, a: &DenseActivations, groups: Range<usize>, out: &SharedOut<'_, f32>) {
        let sums_per_block = F::BLOCK_COLS / 16;
        for g in groups {
            let live = (self.rows - g * LANES).min(LANES);
            for t in 0..a.m() {
                let (x, d_a, sums, scaled) = (a.values(t), a.scales(t), a.sums(t), a.scaled_sums(t));
                for i in 0..live {
                    let (mut acc, mut acc_off) = (0.0f32, 0.0f32);
                    for (b, (block, &da)) in self.group(g).chunks_exact(F::LANE_BYTES).zip(d_a).enumerate() {
                        let xb = &x[b * F::BLOCK_COLS..(b + 1) * F::BLOCK_COLS];
                        let sb = sums.get(b * sums_per_block..(b + 1) * sums_per_block).unwrap_or(&[]);
                        let (on, off) = F::term(block, i, xb, da, sb);
                        acc += on;
                        acc_off += off;
                        if let Some(&sa) = scaled.get(b) {
                            acc_off += F::min_term(block, i, sa);
                        }
                    }
                    out.write(t, g * LANES + i, acc - acc_off);
                }
            }
        }
    }
}

/// Each group of `$groups` against the tokens of `$a` in tiles of up to four, through the
/// calling module's kernel `$f::<T>` (a macro: a closure would not inherit the caller's
/// target features). Expands to unsafe calls: the caller vouches for the features.
#[cfg(target_arch = "x86_64")]
macro_rules! token_tiles {
    ($f:ident, $w:expr, $a:expr, $groups:expr, $out:expr) => {
        token_tiles!($f, [], $w, $a, $groups, $out)
    };
    // `[P,]`: generic arguments of `$f` before the tile's token count.
    ($f:ident, [$($pre:tt)*], $w:expr, $a:expr, $groups:expr, $out:expr) => {
        for g in $groups {
            let mut t0 = 0;
            while t0 < $a.m() {
                match $a.m() - t0 {
                    1 => $f::<$($pre)* 1>($w, $a, g, t0, $out),
                    2 => $f::<$($pre)* 2>($w, $a, g, t0, $out),
                    3 => $f::<$($pre)* 3>($w, $a, g, t0, $out),
                    _ => $f::<$($pre)* 4>($w, $a, g, t0, $out),
                }
                t0 += 4;
            }
        }
    };
}

/// A kernel module's entry points: each runs its layout's kernel `$tiles` over groups `groups`
/// for every token of `a`, compiled with the module's `$features` (a macro: `token_tiles!` must
/// expand inside a function that has them, for the kernels to inline).
#[cfg(target_arch = "x86_64")]
macro_rules! group_runners {
    ($features:literal: $($(#[$doc:meta])* $name:ident($w:ty) => $tiles:ident;)*) => {$(
        $(#[$doc])*
        ///
        /// # Safety
        /// The CPU has the module's features ([`available`]).
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $name(w: &$w, a: &DenseActivations, groups: Range<usize>, out: &SharedOut<'_, f32>) {
            // SAFETY: the caller's features.
            unsafe { token_tiles!($tiles, w, a, groups, out) }
        }
    )*};
}

/// Writes token `t`'s values of the live rows of group `g` (of a matrix of `rows`).
#[cfg(target_arch = "x86_64")]
fn put_group(out: &SharedOut<'_, f32>, t: usize, g: usize, rows: usize, lanes: &[f32; LANES]) {
    let live = (rows - g * LANES).min(LANES);
    for (i, &v) in lanes.iter().enumerate().take(live) {
        out.write(t, g * LANES + i, v);
    }
}

/// Asks for the cache line `GEMV_PREFETCH_BYTES` (3 KiB) past `at` (a hint: it never faults,
/// past the matrix too). A group is one memory stream, yet the hardware prefetcher alone leaves
/// its loads behind the kernel, as for the int8 head (crate::kernels' `GEMV_PREFETCH_BYTES`,
/// the same distance).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(at: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: SSE is part of x86-64; a prefetch never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(crate::kernels::GEMV_PREFETCH_BYTES).cast()) };
}

/// The kernels of these layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Kernel {
    /// The kernel for `path` on this CPU: AVX-512 VNNI for that path, AVX2 for the other x86
    /// SIMD paths, the scalar definition otherwise.
    fn of(path: KernelPath) -> Kernel {
        match path {
            KernelPath::Scalar => Kernel::Scalar,
            KernelPath::Avx512Vnni if avx512::available() => Kernel::Avx512Vnni,
            _ if avx2::available() => Kernel::Avx2,
            _ => Kernel::Scalar,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{
        put_group, LaneFormat, Lanes, Q4Lanes, Q4Legacy, Q6Lanes, Q8Lanes, BLOCK_BYTES, CHUNK, LANES,
        Q40_CODES, Q41_CODES, Q4_BLOCK_BYTES, Q4_CODES, Q4_DMIN, Q4_MINS, Q4_SCALES, Q4_SUBS, Q6_BLOCK_BYTES,
        Q6_CODES, Q6_SUBS, QK, QK_K,
    };
    use crate::dense::DenseActivations;
    use crate::kernels::SharedOut;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    /// Writes token `t`'s sixteen lanes `v` of group `g` (the live rows of a matrix of `rows`).
    ///
    /// # Safety
    /// AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn put_lanes(out: &SharedOut<'_, f32>, t: usize, g: usize, rows: usize, v: __m512) {
        let mut lanes = [0.0f32; LANES];
        // SAFETY: `lanes` holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
        put_group(out, t, g, rows, &lanes);
    }

    group_runners! { "avx512f,avx512bw,avx512vnni":
        /// [`Q8Lanes`] groups `groups` for every token of `a`, up to four tokens per pass over a
        /// group.
        run_groups(Q8Lanes) => group_tokens;
        /// [`Q6Lanes`] groups `groups` for every token of `a`.
        run_q6_groups(Q6Lanes) => q6_group_tokens;
        /// [`Q4Lanes`] groups `groups` for every token of `a`.
        run_q4_groups(Q4Lanes) => q4_group_tokens;
    }

    /// Group `g` against tokens `t0 .. t0 + T`: each block's 16 × 32 codes loaded once for the
    /// `T` tokens.
    ///
    /// # Safety
    /// As [`run_groups`]; `t0 + T <= a.m()`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group_tokens<const T: usize>(
        w: &Q8Lanes,
        a: &DenseActivations,
        g: usize,
        t0: usize,
        out: &SharedOut<'_, f32>,
    ) {
        let ones = _mm512_set1_epi8(1);
        let xs: [&[i8]; T] = std::array::from_fn(|t| a.values(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| a.scales(t0 + t));
        let mut acc = [_mm512_setzero_ps(); T];
        for (b, blk) in w.group(g).chunks_exact(BLOCK_BYTES).enumerate() {
            let blk = blk.as_ptr();
            // SAFETY: a block holds 32 bytes of scales then 8 chunks of 64 bytes; every token
            // holds `cols` activations, so columns 32b .. 32b + 31 are inside it.
            unsafe {
                let d_w = _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast()));
                let (mut w_sum, mut dots) = (_mm512_setzero_si512(), [_mm512_setzero_si512(); T]);
                for j in 0..QK / CHUNK {
                    let codes = _mm512_loadu_si512(blk.add(2 * LANES + j * LANES * CHUNK).cast());
                    w_sum = _mm512_dpbusd_epi32(w_sum, ones, codes);
                    for t in 0..T {
                        let x4 = xs[t].as_ptr().add(b * QK + j * CHUNK).cast::<i32>().read_unaligned();
                        let offset = _mm512_set1_epi32(x4 ^ 0x8080_8080u32 as i32);
                        dots[t] = _mm512_dpbusd_epi32(dots[t], offset, codes);
                    }
                }
                let correction = _mm512_slli_epi32::<7>(w_sum);
                for t in 0..T {
                    let isum = _mm512_cvtepi32_ps(_mm512_sub_epi32(dots[t], correction));
                    let scale = _mm512_mul_ps(d_w, _mm512_set1_ps(scales[t][b]));
                    acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(scale, isum));
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            // SAFETY: the caller's features.
            unsafe { put_lanes(out, t0 + t, g, w.rows, *acc) };
        }
    }
    /// [`Q6Lanes`] group `g` against tokens `t0 .. t0 + T`: per sub-block four `vpdpbusd` of the
    /// unsigned codes with the broadcast activations, `− 32 Σ x`, times the rows' scales.
    ///
    /// # Safety
    /// As [`run_q6_groups`]; `t0 + T <= a.m()`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q6_group_tokens<const T: usize>(
        w: &Q6Lanes,
        a: &DenseActivations,
        g: usize,
        t0: usize,
        out: &SharedOut<'_, f32>,
    ) {
        let xs: [&[i8]; T] = std::array::from_fn(|t| a.values(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| a.scales(t0 + t));
        let sums: [&[i32]; T] = std::array::from_fn(|t| a.sums(t0 + t));
        let mut acc = [_mm512_setzero_ps(); T];
        for (b, blk) in w.group(g).chunks_exact(Q6_BLOCK_BYTES).enumerate() {
            let blk = blk.as_ptr();
            // SAFETY: a super-block holds the scales and 64 chunks of 64 bytes; every token holds
            // `cols` activations and `cols / 16` sums.
            unsafe {
                let d_w = _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast()));
                let mut isum = [_mm512_setzero_si512(); T];
                for s in 0..Q6_SUBS {
                    let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2 * LANES + s * LANES).cast()));
                    let mut part = [_mm512_setzero_si512(); T];
                    for j in 4 * s..4 * s + 4 {
                        let codes = _mm512_loadu_si512(blk.add(Q6_CODES + j * LANES * CHUNK).cast());
                        for t in 0..T {
                            let x4 = xs[t].as_ptr().add(b * QK_K + j * CHUNK).cast::<i32>().read_unaligned();
                            part[t] = _mm512_dpbusd_epi32(part[t], codes, _mm512_set1_epi32(x4));
                        }
                    }
                    for t in 0..T {
                        let centred =
                            _mm512_sub_epi32(part[t], _mm512_set1_epi32(32 * sums[t][b * Q6_SUBS + s]));
                        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(sc, centred));
                    }
                }
                for t in 0..T {
                    let scale = _mm512_mul_ps(d_w, _mm512_set1_ps(scales[t][b]));
                    acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(isum[t])));
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            // SAFETY: the caller's features.
            unsafe { put_lanes(out, t0 + t, g, w.rows, *acc) };
        }
    }
    /// [`Q4Lanes`] group `g` against tokens `t0 .. t0 + T`: per sub-block, each 64-byte chunk's
    /// low and high nibbles (eight columns of the sixteen rows) in two `vpdpbusd` with the
    /// broadcast activations, times the rows' scales; the mins times the activation sums apart.
    ///
    /// # Safety
    /// As [`run_q4_groups`]; `t0 + T <= a.m()`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q4_group_tokens<const T: usize>(
        w: &Q4Lanes,
        a: &DenseActivations,
        g: usize,
        t0: usize,
        out: &SharedOut<'_, f32>,
    ) {
        let nibble = _mm512_set1_epi8(0x0F);
        let xs: [&[i8]; T] = std::array::from_fn(|t| a.values(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| a.scales(t0 + t));
        let sums: [&[i32]; T] = std::array::from_fn(|t| a.sums(t0 + t));
        let (mut acc, mut acc_min) = ([_mm512_setzero_ps(); T], [_mm512_setzero_ps(); T]);
        for (b, blk) in w.group(g).chunks_exact(Q4_BLOCK_BYTES).enumerate() {
            let blk = blk.as_ptr();
            // SAFETY: a super-block holds the scales and 32 chunks of 64 bytes; every token holds
            // `cols` activations and `cols / 16` sums.
            unsafe {
                let d_w = _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast()));
                let dmin_w = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(Q4_DMIN).cast()));
                let (mut isum, mut msum) = ([_mm512_setzero_si512(); T], [_mm512_setzero_si512(); T]);
                for s in 0..Q4_SUBS {
                    let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(Q4_SCALES + s * LANES).cast()));
                    let mins = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(Q4_MINS + s * LANES).cast()));
                    let mut part = [_mm512_setzero_si512(); T];
                    for k in 0..4 {
                        let packed =
                            _mm512_loadu_si512(blk.add(Q4_CODES + (4 * s + k) * LANES * CHUNK).cast());
                        let low = _mm512_and_si512(packed, nibble);
                        let high = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble);
                        for t in 0..T {
                            let x8 = xs[t].as_ptr().add(b * QK_K + 32 * s + 8 * k).cast::<i32>();
                            part[t] =
                                _mm512_dpbusd_epi32(part[t], low, _mm512_set1_epi32(x8.read_unaligned()));
                            part[t] = _mm512_dpbusd_epi32(
                                part[t],
                                high,
                                _mm512_set1_epi32(x8.add(1).read_unaligned()),
                            );
                        }
                    }
                    for t in 0..T {
                        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(sc, part[t]));
                        let sum32 = sums[t][b * 16 + 2 * s] + sums[t][b * 16 + 2 * s + 1];
                        msum[t] =
                            _mm512_add_epi32(msum[t], _mm512_mullo_epi32(mins, _mm512_set1_epi32(sum32)));
                    }
                }
                for t in 0..T {
                    let d_a = _mm512_set1_ps(scales[t][b]);
                    acc[t] = _mm512_add_ps(
                        acc[t],
                        _mm512_mul_ps(_mm512_mul_ps(d_w, d_a), _mm512_cvtepi32_ps(isum[t])),
                    );
                    acc_min[t] = _mm512_add_ps(
                        acc_min[t],
                        _mm512_mul_ps(_mm512_mul_ps(dmin_w, d_a), _mm512_cvtepi32_ps(msum[t])),
                    );
                }
            }
        }
        for t in 0..T {
            // SAFETY: the caller's features.
            unsafe { put_lanes(out, t0 + t, g, w.rows, _mm512_sub_ps(acc[t], acc_min[t])) };
        }
    }
    /// [`Q40Lanes`] / [`Q41Lanes`] groups `groups` for every token of `a`.
    ///
    /// # Safety
    /// AVX-512 F, BW and VNNI ([`available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn run_q4_legacy_groups<const WITH_MIN: bool>(
        w: &Lanes<Q4Legacy<WITH_MIN>>,
        a: &DenseActivations,
        groups: Range<usize>,
        out: &SharedOut<'_, f32>,
    ) {
        // SAFETY: the caller's features.
        unsafe { token_tiles!(q4_legacy_group_tokens, [WITH_MIN,], w, a, groups, out) }
    }

    /// Group `g` of a Q4_0 / Q4_1 matrix against tokens `t0 .. t0 + T`: per block four chunks,
    /// each chunk's low and high nibbles in two `vpdpbusd` with the broadcast activations; Q4_0
    /// takes `8 Σ x` off, Q4_1 sums `m · s_a` apart and adds it at the end.
    ///
    /// # Safety
    /// As [`run_q4_legacy_groups`]; `t0 + T <= a.m()`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q4_legacy_group_tokens<const WITH_MIN: bool, const T: usize>(
        w: &Lanes<Q4Legacy<WITH_MIN>>,
        a: &DenseActivations,
        g: usize,
        t0: usize,
        out: &SharedOut<'_, f32>,
    ) {
        let nibble = _mm512_set1_epi8(0x0F);
        let codes_at = if WITH_MIN { Q41_CODES } else { Q40_CODES };
        let xs: [&[i8]; T] = std::array::from_fn(|t| a.values(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| a.scales(t0 + t));
        let sums: [&[i32]; T] = std::array::from_fn(|t| a.sums(t0 + t));
        let scaled: [&[f32]; T] = std::array::from_fn(|t| a.scaled_sums(t0 + t));
        let (mut acc, mut acc_min) = ([_mm512_setzero_ps(); T], [_mm512_setzero_ps(); T]);
        for (b, blk) in w.group(g).chunks_exact(Q4Legacy::<WITH_MIN>::LANE_BYTES).enumerate() {
            let blk = blk.as_ptr();
            // SAFETY: a block holds the scales and four chunks of 64 bytes; every token holds
            // `cols` activations and `cols / 32` sums and scaled sums.
            unsafe {
                let d_w = _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast()));
                let mut dots = [_mm512_setzero_si512(); T];
                for k in 0..QK / 8 {
                    let packed = _mm512_loadu_si512(blk.add(codes_at + k * LANES * CHUNK).cast());
                    let low = _mm512_and_si512(packed, nibble);
                    let high = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble);
                    for t in 0..T {
                        let x8 = xs[t].as_ptr().add(b * QK + 8 * k).cast::<i32>();
                        dots[t] = _mm512_dpbusd_epi32(dots[t], low, _mm512_set1_epi32(x8.read_unaligned()));
                        dots[t] =
                            _mm512_dpbusd_epi32(dots[t], high, _mm512_set1_epi32(x8.add(1).read_unaligned()));
                    }
                }
                for t in 0..T {
                    let isum = if WITH_MIN {
                        dots[t]
                    } else {
                        _mm512_sub_epi32(dots[t], _mm512_set1_epi32(8 * sums[t][b]))
                    };
                    let scale = _mm512_mul_ps(d_w, _mm512_set1_ps(scales[t][b]));
                    acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(isum)));
                    if WITH_MIN {
                        let m_w = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(2 * LANES).cast()));
                        acc_min[t] =
                            _mm512_add_ps(acc_min[t], _mm512_mul_ps(m_w, _mm512_set1_ps(scaled[t][b])));
                    }
                }
            }
        }
        for t in 0..T {
            let total = if WITH_MIN { _mm512_add_ps(acc[t], acc_min[t]) } else { acc[t] };
            // SAFETY: the caller's features.
            unsafe { put_lanes(out, t0 + t, g, w.rows, total) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{
        prefetch_ahead, put_group, LaneFormat, Lanes, Q4Lanes, Q4Legacy, Q6Lanes, Q8Lanes, BLOCK_BYTES,
        CHUNK, LANES, Q40_CODES, Q41_CODES, Q4_BLOCK_BYTES, Q4_CODES, Q4_DMIN, Q4_MINS, Q4_SCALES, Q4_SUBS,
        Q6_BLOCK_BYTES, Q6_CODES, Q6_SUBS, QK, QK_K,
    };
    use crate::dense::DenseActivations;
    use crate::kernels::SharedOut;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }

    /// Writes token `t`'s lanes of group `g`, rows 0..8 from `low` and 8..16 from `high`.
    ///
    /// # Safety
    /// AVX.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn put_halves(
        out: &SharedOut<'_, f32>,
        t: usize,
        g: usize,
        rows: usize,
        low: __m256,
        high: __m256,
    ) {
        let mut lanes = [0.0f32; LANES];
        // SAFETY: `lanes` holds 16 floats.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), low);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), high);
        }
        put_group(out, t, g, rows, &lanes);
    }

    /// [`Q8Lanes`] groups `groups` as the AVX-512 kernel does, each group in two halves of
    /// eight rows (one 8-lane register each): per four columns `vpmaddubsw` of the activations'
    /// magnitudes with the codes carrying the activations' signs, then `vpmaddwd` with ones
    /// (pair sums below 2¹⁵: codes and activations within ±127). A matrix holding a −128 code,
    /// which `vpsignb` cannot negate, takes the codes' magnitudes (128 as an unsigned byte) with
    /// the activations carrying the codes' signs instead: one more instruction per vector.
    ///
    /// # Safety
    /// AVX2 and F16C ([`available`]).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn run_groups(
        w: &Q8Lanes,
        a: &DenseActivations,
        groups: Range<usize>,
        out: &SharedOut<'_, f32>,
    ) {
        // SAFETY: the caller's features.
        unsafe {
            if w.unnegatable {
                token_tiles!(group_tokens, [true,], w, a, groups, out)
            } else {
                token_tiles!(group_tokens, [false,], w, a, groups, out)
            }
        }
    }

    group_runners! { "avx2,f16c":
        /// [`Q6Lanes`] groups `groups` for every token of `a`, in halves of eight rows.
        run_q6_groups(Q6Lanes) => q6_group_tokens;
        /// [`Q4Lanes`] groups `groups` for every token of `a`, in halves of eight rows.
        run_q4_groups(Q4Lanes) => q4_group_tokens;
    }

    /// # Safety
    /// As [`run_groups`]; `t0 + T <= a.m()`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn group_tokens<const UNNEGATABLE: bool, const T: usize>(
        w: &Q8Lanes,
        a: &DenseActivations,
        g: usize,
        t0: usize,
        out: &SharedOut<'_, f32>,
    ) {
        let ones = _mm256_set1_epi16(1);
        let xs: [&[i8]; T] = std::array::from_fn(|t| a.values(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| a.scales(t0 + t));
        // acc[h][t]: rows 8h .. 8h + 7 of token t.
        let mut acc = [[_mm256_setzero_ps(); T]; 2];
        for (b, blk) in w.group(g).chunks_exact(BLOCK_BYTES).enumerate() {
            let blk = blk.as_ptr();
            // SAFETY: as in the AVX-512 kernel.
            unsafe {
                let d_w = [0, 1].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h).cast())));
                let mut dots = [[_mm256_setzero_si256(); T]; 2];
                for j in 0..QK / CHUNK {
                    let x4: [__m256i; T] = std::array::from_fn(|t| {
                        _mm256_set1_epi32(
                            xs[t].as_ptr().add(b * QK + j * CHUNK).cast::<i32>().read_unaligned(),
                        )
                    });
                    // A line 3 KiB ahead per 64-byte chunk read (see prefetch_ahead).
                    prefetch_ahead(blk.add(2 * LANES + j * LANES * CHUNK));
                    // The activations' magnitudes, shared by both halves (unused for a matrix
                    // with −128 codes).
                    let x4_magnitude: [__m256i; T] = std::array::from_fn(|t| _mm256_abs_epi8(x4[t]));
                    for (h, dots) in dots.iter_mut().enumerate() {
                        let codes =
                            _mm256_loadu_si256(blk.add(2 * LANES + j * LANES * CHUNK + 32 * h).cast());
                        for t in 0..T {
                            let pairs = if UNNEGATABLE {
                                _mm256_maddubs_epi16(
                                    _mm256_sign_epi8(codes, codes),
                                    _mm256_sign_epi8(x4[t], codes),
                                )
                            } else {
                                _mm256_maddubs_epi16(x4_magnitude[t], _mm256_sign_epi8(codes, x4[t]))
                            };
                            dots[t] = _mm256_add_epi32(dots[t], _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
                for h in 0..2 {
                    for t in 0..T {
                        let scale = _mm256_mul_ps(d_w[h], _mm256_set1_ps(scales[t][b]));
                        let isum = _mm256_cvtepi32_ps(dots[h][t]);
                        acc[h][t] = _mm256_add_ps(acc[h][t], _mm256_mul_ps(scale, isum));
                    }
                }
            }
        }
        for (t, (low, high)) in acc[0].iter().zip(&acc[1]).enumerate() {
            // SAFETY: the caller's features.
            unsafe { put_halves(out, t0 + t, g, w.rows, *low, *high) };
        }
    }
    /// As the AVX-512 kernel: `vpmaddubsw` of the unsigned codes (below 64) with the
    /// activations (pair sums below 2¹⁵), `vpmaddwd` with ones.
    ///
    /// # Safety
    /// As [`run_q6_groups`]; `t0 + T <= a.m()`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn q6_group_tokens<const T: usize>(
        w: &Q6Lanes,
        a: &DenseActivations,
        g: usize,
        t0: usize,
        out: &SharedOut<'_, f32>,
    ) {
        let ones = _mm256_set1_epi16(1);
        let xs: [&[i8]; T] = std::array::from_fn(|t| a.values(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| a.scales(t0 + t));
        let sums: [&[i32]; T] = std::array::from_fn(|t| a.sums(t0 + t));
        let mut acc = [[_mm256_setzero_ps(); T]; 2];
        for (b, blk) in w.group(g).chunks_exact(Q6_BLOCK_BYTES).enumerate() {
            let blk = blk.as_ptr();
            // SAFETY: as in the AVX-512 kernel.
            unsafe {
                let d_w = [0, 1].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h).cast())));
                let mut isum = [[_mm256_setzero_si256(); T]; 2];
                for s in 0..Q6_SUBS {
                    let sc = [0, 1].map(|h| {
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 * LANES + s * LANES + 8 * h).cast()))
                    });
                    let mut part = [[_mm256_setzero_si256(); T]; 2];
                    for j in 4 * s..4 * s + 4 {
                        let x4: [__m256i; T] = std::array::from_fn(|t| {
                            _mm256_set1_epi32(
                                xs[t].as_ptr().add(b * QK_K + j * CHUNK).cast::<i32>().read_unaligned(),
                            )
                        });
                        for (h, part) in part.iter_mut().enumerate() {
                            let codes =
                                _mm256_loadu_si256(blk.add(Q6_CODES + j * LANES * CHUNK + 32 * h).cast());
                            for t in 0..T {
                                let pairs = _mm256_maddubs_epi16(codes, x4[t]);
                                part[t] = _mm256_add_epi32(part[t], _mm256_madd_epi16(pairs, ones));
                            }
                        }
                    }
                    for h in 0..2 {
                        for t in 0..T {
                            let centred = _mm256_sub_epi32(
                                part[h][t],
                                _mm256_set1_epi32(32 * sums[t][b * Q6_SUBS + s]),
                            );
                            isum[h][t] = _mm256_add_epi32(isum[h][t], _mm256_mullo_epi32(sc[h], centred));
                        }
                    }
                }
                for h in 0..2 {
                    for t in 0..T {
                        let scale = _mm256_mul_ps(d_w[h], _mm256_set1_ps(scales[t][b]));
                        acc[h][t] =
                            _mm256_add_ps(acc[h][t], _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum[h][t])));
                    }
                }
            }
        }
        for (t, (low, high)) in acc[0].iter().zip(&acc[1]).enumerate() {
            // SAFETY: the caller's features.
            unsafe { put_halves(out, t0 + t, g, w.rows, *low, *high) };
        }
    }
    /// As the AVX-512 kernel: `vpmaddubsw` of the nibbles (below 16) with the activations
    /// (pair sums below 2¹⁵), `vpmaddwd` with ones.
    ///
    /// # Safety
    /// As [`run_q4_groups`]; `t0 + T <= a.m()`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn q4_group_tokens<const T: usize>(
        w: &Q4Lanes,
        a: &DenseActivations,
        g: usize,
        t0: usize,
        out: &SharedOut<'_, f32>,
    ) {
        let (ones, nibble) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0F));
        let xs: [&[i8]; T] = std::array::from_fn(|t| a.values(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| a.scales(t0 + t));
        let sums: [&[i32]; T] = std::array::from_fn(|t| a.sums(t0 + t));
        let (mut acc, mut acc_min) = ([[_mm256_setzero_ps(); T]; 2], [[_mm256_setzero_ps(); T]; 2]);
        for (b, blk) in w.group(g).chunks_exact(Q4_BLOCK_BYTES).enumerate() {
            let blk = blk.as_ptr();
            // SAFETY: as in the AVX-512 kernel.
            unsafe {
                let d_w = [0, 1].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h).cast())));
                let dmin_w =
                    [0, 1].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(Q4_DMIN + 16 * h).cast())));
                let mut isum = [[_mm256_setzero_si256(); T]; 2];
                let mut msum = [[_mm256_setzero_si256(); T]; 2];
                for s in 0..Q4_SUBS {
                    let byte_lanes = |at: usize| {
                        [0, 1].map(|h| {
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(blk.add(at + s * LANES + 8 * h).cast()))
                        })
                    };
                    let (sc, mins) = (byte_lanes(Q4_SCALES), byte_lanes(Q4_MINS));
                    let mut part = [[_mm256_setzero_si256(); T]; 2];
                    for k in 0..4 {
                        let x8: [[__m256i; 2]; T] = std::array::from_fn(|t| {
                            let p = xs[t].as_ptr().add(b * QK_K + 32 * s + 8 * k).cast::<i32>();
                            [
                                _mm256_set1_epi32(p.read_unaligned()),
                                _mm256_set1_epi32(p.add(1).read_unaligned()),
                            ]
                        });
                        for (h, part) in part.iter_mut().enumerate() {
                            let packed = _mm256_loadu_si256(
                                blk.add(Q4_CODES + (4 * s + k) * LANES * CHUNK + 32 * h).cast(),
                            );
                            let low = _mm256_and_si256(packed, nibble);
                            let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibble);
                            for t in 0..T {
                                let pairs = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(low, x8[t][0]),
                                    _mm256_maddubs_epi16(high, x8[t][1]),
                                );
                                part[t] = _mm256_add_epi32(part[t], _mm256_madd_epi16(pairs, ones));
                            }
                        }
                    }
                    for h in 0..2 {
                        for t in 0..T {
                            isum[h][t] = _mm256_add_epi32(isum[h][t], _mm256_mullo_epi32(sc[h], part[h][t]));
                            let sum32 = sums[t][b * 16 + 2 * s] + sums[t][b * 16 + 2 * s + 1];
                            msum[h][t] = _mm256_add_epi32(
                                msum[h][t],
                                _mm256_mullo_epi32(mins[h], _mm256_set1_epi32(sum32)),
                            );
                        }
                    }
                }
                for h in 0..2 {
                    for t in 0..T {
                        let d_a = _mm256_set1_ps(scales[t][b]);
                        let on = _mm256_mul_ps(_mm256_mul_ps(d_w[h], d_a), _mm256_cvtepi32_ps(isum[h][t]));
                        let off =
                            _mm256_mul_ps(_mm256_mul_ps(dmin_w[h], d_a), _mm256_cvtepi32_ps(msum[h][t]));
                        acc[h][t] = _mm256_add_ps(acc[h][t], on);
                        acc_min[h][t] = _mm256_add_ps(acc_min[h][t], off);
                    }
                }
            }
        }
        for t in 0..T {
            let (low, high) =
                (_mm256_sub_ps(acc[0][t], acc_min[0][t]), _mm256_sub_ps(acc[1][t], acc_min[1][t]));
            // SAFETY: the caller's features.
            unsafe { put_halves(out, t0 + t, g, w.rows, low, high) };
        }
    }
    /// [`Q40Lanes`] / [`Q41Lanes`] groups `groups` for every token of `a`, in halves of eight rows.
    ///
    /// # Safety
    /// AVX2 and F16C ([`available`]).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn run_q4_legacy_groups<const WITH_MIN: bool>(
        w: &Lanes<Q4Legacy<WITH_MIN>>,
        a: &DenseActivations,
        groups: Range<usize>,
        out: &SharedOut<'_, f32>,
    ) {
        // SAFETY: the caller's features.
        unsafe { token_tiles!(q4_legacy_group_tokens, [WITH_MIN,], w, a, groups, out) }
    }

    /// As the AVX-512 kernel: `vpmaddubsw` of the nibbles (below 16) with the activations,
    /// the two nibbles' pairs added in i16 (below 2¹⁵), `vpmaddwd` with ones.
    ///
    /// # Safety
    /// As [`run_q4_legacy_groups`]; `t0 + T <= a.m()`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn q4_legacy_group_tokens<const WITH_MIN: bool, const T: usize>(
        w: &Lanes<Q4Legacy<WITH_MIN>>,
        a: &DenseActivations,
        g: usize,
        t0: usize,
        out: &SharedOut<'_, f32>,
    ) {
        let (ones, nibble) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0F));
        let codes_at = if WITH_MIN { Q41_CODES } else { Q40_CODES };
        let xs: [&[i8]; T] = std::array::from_fn(|t| a.values(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| a.scales(t0 + t));
        let sums: [&[i32]; T] = std::array::from_fn(|t| a.sums(t0 + t));
        let scaled: [&[f32]; T] = std::array::from_fn(|t| a.scaled_sums(t0 + t));
        let (mut acc, mut acc_min) = ([[_mm256_setzero_ps(); T]; 2], [[_mm256_setzero_ps(); T]; 2]);
        for (b, blk) in w.group(g).chunks_exact(Q4Legacy::<WITH_MIN>::LANE_BYTES).enumerate() {
            let blk = blk.as_ptr();
            // SAFETY: as in the AVX-512 kernel.
            unsafe {
                let d_w = [0, 1].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h).cast())));
                let mut dots = [[_mm256_setzero_si256(); T]; 2];
                for k in 0..QK / 8 {
                    let x8: [[__m256i; 2]; T] = std::array::from_fn(|t| {
                        let p = xs[t].as_ptr().add(b * QK + 8 * k).cast::<i32>();
                        [_mm256_set1_epi32(p.read_unaligned()), _mm256_set1_epi32(p.add(1).read_unaligned())]
                    });
                    for (h, dots) in dots.iter_mut().enumerate() {
                        let packed =
                            _mm256_loadu_si256(blk.add(codes_at + k * LANES * CHUNK + 32 * h).cast());
                        let low = _mm256_and_si256(packed, nibble);
                        let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibble);
                        for t in 0..T {
                            let pairs = _mm256_add_epi16(
                                _mm256_maddubs_epi16(low, x8[t][0]),
                                _mm256_maddubs_epi16(high, x8[t][1]),
                            );
                            dots[t] = _mm256_add_epi32(dots[t], _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
                for h in 0..2 {
                    for t in 0..T {
                        let isum = if WITH_MIN {
                            dots[h][t]
                        } else {
                            _mm256_sub_epi32(dots[h][t], _mm256_set1_epi32(8 * sums[t][b]))
                        };
                        let scale = _mm256_mul_ps(d_w[h], _mm256_set1_ps(scales[t][b]));
                        acc[h][t] = _mm256_add_ps(acc[h][t], _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum)));
                        if WITH_MIN {
                            let m_w = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(2 * LANES + 16 * h).cast()));
                            acc_min[h][t] = _mm256_add_ps(
                                acc_min[h][t],
                                _mm256_mul_ps(m_w, _mm256_set1_ps(scaled[t][b])),
                            );
                        }
                    }
                }
            }
        }
        for t in 0..T {
            let total = |h: usize| if WITH_MIN { _mm256_add_ps(acc[h][t], acc_min[h][t]) } else { acc[h][t] };
            // SAFETY: the caller's features.
            unsafe { put_halves(out, t0 + t, g, w.rows, total(0), total(1)) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(super) fn available() -> bool {
        false
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub(super) fn available() -> bool {
        false
    }
}
