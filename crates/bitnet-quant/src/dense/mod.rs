//! Dense (non-ternary) linear layers kept in their stored encoding: F32, F16, BF16, Q8_0, Q4_0,
//! Q4_1, Q4_K and Q6_K, as GGUF files (and safetensors checkpoints, for the float types) hold
//! them. Tables in a group-scaled ternary format (TQ1_0, TQ2_0, Q1_0, Q2_0, PQ2_0, PTQ1_0: an
//! embedding table, a head) are kept as stored too, so that lookups decode only the rows they
//! need; their product is the f32 dot of the decoded row (a head in these formats runs on the
//! ternary kernels instead, [`crate::TernaryMatrix`]).
//!
//! `out[t, r] = Σ_c W[r, c] · x[t, c]`, computed the way llama.cpp's CPU backend computes it, so
//! that a model answers as it does under llama.cpp:
//!
//! * **Q8_0, Q4_0, Q4_1** take activations quantized to blocks of 32 int8 values
//!   ([`ActivationKind::Q8Blocks`]: ggml's `quantize_row_q8_0` / `quantize_row_q8_1` on x86), one
//!   exact i32 dot product per block, then `Σ_b (d_w · d_a) · isum_b` in f32; Q4_1 adds
//!   `Σ_b m_w · s_a` with `s_a = f16(d_a · Σ q_a)` (Q8_1's block sum), kept in a second
//!   accumulator and added at the end.
//! * **Q4_K, Q6_K** take activations quantized to Q8_K ([`ActivationKind::Q8K`]: blocks of 256,
//!   an f32 scale, sums of 16): per super-block an exact i32 `isum` (the sub-block scales
//!   applied in integers, as `ggml_vec_dot_q4_K_q8_K` / `q6_K_q8_K` do), then
//!   `Σ_b (d_w · d_a) · isum_b` in f32; Q4_K subtracts `Σ_b (dmin_w · d_a) · msum_b` (its mins
//!   against the activation sums), kept in a second accumulator.
//! * **F32, F16, BF16** are a float dot product of the widened weights with the f32 activations,
//!   accumulated in f32. (llama.cpp rounds the activations to the weight type first; this engine
//!   keeps them in f32, as transformers does.)
//!
//! Every product has one definition, the scalar code in [`scalar`]. The SIMD paths (AVX2 on
//! x86-64, eight rows and up to four tokens at a time, each block decoded once for the tokens;
//! NEON on aarch64, a row at a time) compute
//! the same per-block integers bit for bit (`vpmaddubsw`/`vpmaddwd` are exact here: the pair
//! sums stay below 2¹⁵) and combine them in the same order, block after block, each block's term
//! `(d_w · d_a) · isum` rounded as the scalar code rounds it (a multiply, a multiply, an add; no
//! fused multiply-add), so their outputs equal the scalar ones exactly. Only the float formats
//! sum in another order (eight lanes, fused multiply-adds); they stay within the bound
//! [`float_dot_bound`] of the scalar sum.
//!
//! Work is split by output rows over rayon's pool as the ternary kernels do; activation
//! buffers ([`DenseActivations`]) are owned by the caller, or, for [`DenseLinear::forward`],
//! kept per thread, so a decode step allocates nothing once they have grown to size.

use std::cell::RefCell;
use std::ops::Range;

use bitnet_core::{DenseData, DenseMatrix};

use crate::aligned::AlignedBytes;
use crate::formats::{self, GgmlType};
use crate::kernels::{self, for_ranges, KernelPath, SharedOut};
use crate::shared::SharedBytes;

mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod lanes;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod scalar;

pub use activations::{ActivationKind, DenseActivations};
pub use lanes::{Q40Lanes, Q41Lanes, Q4Lanes, Q6Lanes, Q8Lanes};

/// Elements per block of Q8_0, Q4_0, Q4_1 (and of the activations they take).
pub const QK: usize = 32;
/// Elements per super-block of Q4_K, Q6_K and Q8_K.
pub const QK_K: usize = 256;

/// The storage formats a [`DenseLinear`] runs from.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenseFormat {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
    Q6_K,
    TQ1_0,
    TQ2_0,
    Q1_0,
    Q2_0,
    PQ2_0,
    PTQ1_0,
}

impl DenseFormat {
    /// The formats dense projections run from (the ternary ones are in [`DenseFormat::TERNARY`]).
    pub const ALL: [DenseFormat; 8] = [
        DenseFormat::F32,
        DenseFormat::F16,
        DenseFormat::BF16,
        DenseFormat::Q8_0,
        DenseFormat::Q4_0,
        DenseFormat::Q4_1,
        DenseFormat::Q4_K,
        DenseFormat::Q6_K,
    ];

    /// The group-scaled ternary formats a table can be kept in.
    pub const TERNARY: [DenseFormat; 6] = [
        DenseFormat::TQ1_0,
        DenseFormat::TQ2_0,
        DenseFormat::Q1_0,
        DenseFormat::Q2_0,
        DenseFormat::PQ2_0,
        DenseFormat::PTQ1_0,
    ];

    /// The format of a GGUF tensor type, if a dense layer can run from it.
    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        Some(match t {
            GgmlType::F32 => DenseFormat::F32,
            GgmlType::F16 => DenseFormat::F16,
            GgmlType::BF16 => DenseFormat::BF16,
            GgmlType::Q8_0 => DenseFormat::Q8_0,
            GgmlType::Q4_0 => DenseFormat::Q4_0,
            GgmlType::Q4_1 => DenseFormat::Q4_1,
            GgmlType::Q4_K => DenseFormat::Q4_K,
            GgmlType::Q6_K => DenseFormat::Q6_K,
            GgmlType::TQ1_0 => DenseFormat::TQ1_0,
            GgmlType::TQ2_0 => DenseFormat::TQ2_0,
            GgmlType::Q1_0 => DenseFormat::Q1_0,
            GgmlType::Q2_0 => DenseFormat::Q2_0,
            GgmlType::PQ2_0 => DenseFormat::PQ2_0,
            GgmlType::PTQ1_0 => DenseFormat::PTQ1_0,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            DenseFormat::F32 => GgmlType::F32,
            DenseFormat::F16 => GgmlType::F16,
            DenseFormat::BF16 => GgmlType::BF16,
            DenseFormat::Q8_0 => GgmlType::Q8_0,
            DenseFormat::Q4_0 => GgmlType::Q4_0,
            DenseFormat::Q4_1 => GgmlType::Q4_1,
            DenseFormat::Q4_K => GgmlType::Q4_K,
            DenseFormat::Q6_K => GgmlType::Q6_K,
            DenseFormat::TQ1_0 => GgmlType::TQ1_0,
            DenseFormat::TQ2_0 => GgmlType::TQ2_0,
            DenseFormat::Q1_0 => GgmlType::Q1_0,
            DenseFormat::Q2_0 => GgmlType::Q2_0,
            DenseFormat::PQ2_0 => GgmlType::PQ2_0,
            DenseFormat::PTQ1_0 => GgmlType::PTQ1_0,
        }
    }

    /// Elements per block: a row must hold a whole number of them.
    pub fn block(self) -> usize {
        self.ggml().block_geometry().0 as usize
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml().block_geometry().1 as usize
    }

    /// The activation encoding this format's dot product takes.
    pub fn activation_kind(self) -> ActivationKind {
        match self {
            DenseFormat::F32 | DenseFormat::F16 | DenseFormat::BF16 => ActivationKind::F32,
            DenseFormat::Q8_0 | DenseFormat::Q4_0 | DenseFormat::Q4_1 => ActivationKind::Q8Blocks,
            DenseFormat::Q4_K | DenseFormat::Q6_K => ActivationKind::Q8K,
            // The decoded row against the floats.
            ternary => {
                debug_assert!(ternary.is_ternary());
                ActivationKind::F32
            }
        }
    }

    /// True for the float formats F32, F16, BF16.
    pub fn is_float(self) -> bool {
        matches!(self, DenseFormat::F32 | DenseFormat::F16 | DenseFormat::BF16)
    }

    /// True for the group-scaled ternary formats ([`DenseFormat::TERNARY`]).
    pub fn is_ternary(self) -> bool {
        Self::TERNARY.contains(&self)
    }

    pub fn name(self) -> &'static str {
        self.ggml().name()
    }
}

impl std::fmt::Display for DenseFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with a dense layer's data or with the arguments of a product.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DenseError {
    #[error(
        "{format}: a dense layer cannot run from this tensor type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; \
         tables also TQ1_0, TQ2_0, Q1_0, Q2_0, PQ2_0, PTQ1_0)"
    )]
    UnsupportedFormat { format: GgmlType },
    #[error("{format}: rows of {cols} columns are not a multiple of the block of {block}")]
    NotBlockMultiple { format: DenseFormat, cols: usize, block: usize },
    #[error("{format}: a [{rows}, {cols}] matrix takes {expected} bytes, got {got}")]
    ByteLength { format: DenseFormat, rows: usize, cols: usize, expected: usize, got: usize },
    #[error("a [{rows}, {cols}] matrix is too large to address")]
    Overflow { rows: usize, cols: usize },
    #[error("input holds {got} values, but {m} tokens of width {cols} need {expected}")]
    InputLength { m: usize, cols: usize, expected: usize, got: usize },
    #[error("output holds {got} values, but {m} tokens of {rows} rows need {expected}")]
    OutputLength { m: usize, rows: usize, expected: usize, got: usize },
    #[error("activations of width {got} do not match the {expected} columns of the matrix")]
    ActivationWidth { expected: usize, got: usize },
    #[error("{format} weights take {needed:?} activations, but the buffer holds {got:?}")]
    ActivationKind { format: DenseFormat, needed: ActivationKind, got: ActivationKind },
    #[error("{kind:?} activations: width {k} is not a multiple of the block of {block}")]
    ActivationBlock { kind: ActivationKind, k: usize, block: usize },
    #[error("row {row} is out of range: the matrix has {rows} rows")]
    RowOutOfRange { row: usize, rows: usize },
    #[error("a row of {cols} values does not fit a buffer of {got}")]
    RowBuffer { cols: usize, got: usize },
    #[error("a row order of {got} entries cannot reorder {rows} rows")]
    RowOrder { rows: usize, got: usize },
    #[error("the {matrices} matrices of one product must all take {expected:?} activations of width {cols}")]
    Mismatched { matrices: usize, expected: ActivationKind, cols: usize },
}

/// A `[rows, cols]` weight matrix (`rows` = out features) in one of the [`DenseFormat`]s, kept
/// as stored: each row is `cols / block` consecutive blocks of the format, rows one after
/// another, exactly the bytes of the GGUF tensor (or the little-endian floats of a
/// safetensors one).
///
/// The bytes are a copy of their own (aligned, on huge pages where they are large: what a
/// matrix read every token wants) or a view into the checkpoint's mapping
/// ([`DenseLinear::from_shared`]: what a table that only serves lookups wants, since only the
/// rows looked up are ever read in).
#[derive(Clone, Debug)]
pub struct DenseLinear {
    format: DenseFormat,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Storage,
    /// Block formats only: multiply the dequantized weights with the f32 activations
    /// ([`DenseLinear::with_float_activations`]).
    float_activations: bool,
}

#[derive(Clone, Debug)]
enum Storage {
    Owned(AlignedBytes),
    Shared(SharedBytes),
}

impl Storage {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(b) => b.as_bytes(),
            Storage::Shared(b) => b.as_bytes(),
        }
    }
}

/// Rows converted between two release hints when a shared matrix is copied: a few MB, so the
/// mapped source and the copy overlap by no more than one block.
const COPY_BLOCK_BYTES: usize = 4 << 20;

impl DenseLinear {
    /// Takes the stored bytes of a tensor of `format` (a GGUF type) as a `[rows, cols]` matrix.
    pub fn from_bytes(format: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, DenseError> {
        let format = DenseFormat::from_ggml(format).ok_or(DenseError::UnsupportedFormat { format })?;
        let row_bytes = Self::check_shape(format, rows, cols)?;
        let expected = rows.checked_mul(row_bytes).ok_or(DenseError::Overflow { rows, cols })?;
        if bytes.len() != expected {
            return Err(DenseError::ByteLength { format, rows, cols, expected, got: bytes.len() });
        }
        let mut data = AlignedBytes::zeroed(expected);
        data.as_bytes_mut().copy_from_slice(bytes);
        Ok(Self { format, rows, cols, row_bytes, data: Storage::Owned(data), float_activations: false })
    }

    /// Takes the stored bytes of a tensor of `format` as a `[rows, cols]` matrix without copying
    /// them: the matrix reads them where they are (a checkpoint's mapping) and keeps them alive.
    pub fn from_shared(
        format: GgmlType,
        rows: usize,
        cols: usize,
        bytes: SharedBytes,
    ) -> Result<Self, DenseError> {
        let format = DenseFormat::from_ggml(format).ok_or(DenseError::UnsupportedFormat { format })?;
        let row_bytes = Self::check_shape(format, rows, cols)?;
        let expected = rows.checked_mul(row_bytes).ok_or(DenseError::Overflow { rows, cols })?;
        if bytes.len() != expected {
            return Err(DenseError::ByteLength { format, rows, cols, expected, got: bytes.len() });
        }
        Ok(Self { format, rows, cols, row_bytes, data: Storage::Shared(bytes), float_activations: false })
    }

    /// Whether the bytes are a view into memory owned elsewhere ([`DenseLinear::from_shared`]).
    pub fn is_shared(&self) -> bool {
        matches!(self.data, Storage::Shared(_))
    }

    /// Tells the owner of a shared matrix's bytes that rows `rows` are not needed now: a file
    /// mapping drops their pages from the process until they are read again
    /// ([`crate::ByteSource::release`]). A matrix with its own copy ignores it.
    pub fn release_rows(&self, rows: Range<usize>) {
        if let Storage::Shared(b) = &self.data {
            b.release_range(rows.start * self.row_bytes..rows.end.min(self.rows) * self.row_bytes);
        }
    }

    /// [`DenseLinear::release_rows`] for every row.
    pub fn release(&self) {
        self.release_rows(0..self.rows);
    }

    /// Rows per block when a shared matrix is copied (at least one).
    fn copy_block_rows(&self) -> usize {
        (COPY_BLOCK_BYTES / self.row_bytes.max(1)).max(1)
    }

    /// The matrix with bytes of its own: a shared one is copied a block of rows at a time, each
    /// block's source pages released once copied, so that the source and the copy are never
    /// both resident whole.
    pub fn into_owned(self) -> Self {
        let Storage::Shared(shared) = &self.data else {
            return self;
        };
        let mut data = AlignedBytes::zeroed(self.bytes());
        let block = self.copy_block_rows() * self.row_bytes;
        for (i, out) in data.as_bytes_mut().chunks_mut(block).enumerate() {
            let range = i * block..i * block + out.len();
            out.copy_from_slice(&shared.as_bytes()[range.clone()]);
            shared.release_range(range);
        }
        Self { data: Storage::Owned(data), ..self }
    }

    /// An F32 matrix from row-major values.
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Result<Self, DenseError> {
        Self::encode(DenseFormat::F32, w, rows, cols)
    }

    /// Encodes row-major floats in `format`, for the formats that have a quantizer here
    /// (F32, F16, BF16, Q8_0, Q6_K: [`crate::formats::quantize`]).
    pub fn encode(format: DenseFormat, w: &[f32], rows: usize, cols: usize) -> Result<Self, DenseError> {
        Self::check_shape(format, rows, cols)?;
        let n = rows.checked_mul(cols).ok_or(DenseError::Overflow { rows, cols })?;
        if w.len() != n {
            return Err(DenseError::InputLength { m: rows, cols, expected: n, got: w.len() });
        }
        let bytes = formats::quantize(format.ggml(), w)
            .map_err(|_| DenseError::UnsupportedFormat { format: format.ggml() })?;
        Self::from_bytes(format.ggml(), rows, cols, &bytes)
    }

    /// Bytes per row; checks that rows hold whole blocks.
    fn check_shape(format: DenseFormat, rows: usize, cols: usize) -> Result<usize, DenseError> {
        let block = format.block();
        if !cols.is_multiple_of(block) {
            return Err(DenseError::NotBlockMultiple { format, cols, block });
        }
        let row_bytes =
            (cols / block).checked_mul(format.block_bytes()).ok_or(DenseError::Overflow { rows, cols })?;
        rows.checked_mul(row_bytes).ok_or(DenseError::Overflow { rows, cols })?;
        Ok(row_bytes)
    }

    pub fn format(&self) -> DenseFormat {
        self.format
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes the weights take (what a product streams).
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    /// The activation encoding [`DenseLinear::forward_quantized`] takes.
    pub fn activation_kind(&self) -> ActivationKind {
        if self.float_activations {
            return ActivationKind::F32;
        }
        self.format.activation_kind()
    }

    /// The same matrix computing as transformers does from a dequantized GGUF: each row of a
    /// block format decoded to f32 and dotted with the f32 activations (no activation
    /// quantization), instead of llama.cpp's integer block products. Slower; its numbers are a
    /// float model's. No change for the float formats, which already work this way.
    pub fn with_float_activations(mut self, on: bool) -> Self {
        self.set_float_activations(on);
        self
    }

    /// [`DenseLinear::with_float_activations`] in place.
    pub fn set_float_activations(&mut self, on: bool) {
        self.float_activations = on && !self.format.is_float();
    }

    /// True when a block format runs on f32 activations ([`DenseLinear::with_float_activations`]).
    pub fn float_activations(&self) -> bool {
        self.float_activations
    }
    /// The stored bytes, row after row.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data.as_bytes()[..self.bytes()]
    }
    /// The stored bytes of row `r` (callers index inside `rows`).
    pub(crate) fn row(&self, r: usize) -> &[u8] {
        &self.data.as_bytes()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` decoded to f32 into `out[..cols]`: an embedding lookup reads only the rows it
    /// needs.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), DenseError> {
        if r >= self.rows {
            return Err(DenseError::RowOutOfRange { row: r, rows: self.rows });
        }
        if out.len() < self.cols {
            return Err(DenseError::RowBuffer { cols: self.cols, got: out.len() });
        }
        formats::dequantize_into(self.format.ggml(), self.row(r), self.cols, &mut out[..self.cols]).map_err(
            |_| DenseError::ByteLength {
                format: self.format,
                rows: 1,
                cols: self.cols,
                expected: self.row_bytes,
                got: self.row(r).len(),
            },
        )
    }

    /// The whole matrix decoded to f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate().take(self.rows) {
            // Every row is in range and holds whole blocks (checked at construction).
            let _ = self.dequantize_row(r, row);
        }
        out
    }

    /// A float matrix as a dense layer (its values, in its dtype).
    pub fn from_dense_matrix(m: &DenseMatrix) -> Result<Self, DenseError> {
        let (format, bytes): (GgmlType, Vec<u8>) = match &m.data {
            DenseData::F32(v) => (GgmlType::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DenseData::F16(v) => (GgmlType::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DenseData::Bf16(v) => (GgmlType::BF16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        Self::from_bytes(format, m.rows, m.cols, &bytes)
    }

    /// The matrix as a [`DenseMatrix`]: the float formats keep their dtype (exact), the block
    /// formats are widened to f32 (exact too, at 4 bytes per weight).
    pub fn to_dense_matrix(&self) -> DenseMatrix {
        self.dense_matrix_by_blocks(|_| {})
    }

    /// [`DenseLinear::to_dense_matrix`] for a matrix that is no longer needed: a shared one's
    /// source pages are released a block of rows at a time as the copy grows, so the source and
    /// the copy are never both resident whole.
    pub fn into_dense_matrix(self) -> DenseMatrix {
        self.dense_matrix_by_blocks(|rows| self.release_rows(rows))
    }

    /// Builds the [`DenseMatrix`] a block of rows at a time, calling `done(rows)` after each.
    fn dense_matrix_by_blocks(&self, mut done: impl FnMut(Range<usize>)) -> DenseMatrix {
        let (rows, cols, block) = (self.rows, self.cols, self.copy_block_rows());
        let bits = |r: Range<usize>| {
            self.as_bytes()[r.start * self.row_bytes..r.end * self.row_bytes]
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let blocks = (0..rows).step_by(block).map(|r| r..(r + block).min(rows));
        // `with_capacity` reserves address space only: pages become resident as blocks land.
        let data = match self.format {
            DenseFormat::F16 => {
                let mut v = Vec::with_capacity(rows * cols);
                for r in blocks {
                    v.extend(bits(r.clone()).map(half::f16::from_bits));
                    done(r);
                }
                DenseData::F16(v)
            }
            DenseFormat::BF16 => {
                let mut v = Vec::with_capacity(rows * cols);
                for r in blocks {
                    v.extend(bits(r.clone()).map(half::bf16::from_bits));
                    done(r);
                }
                DenseData::Bf16(v)
            }
            _ => {
                let mut v = vec![0.0; rows * cols];
                for r in blocks {
                    for (i, row) in v[r.start * cols..r.end * cols].chunks_exact_mut(cols.max(1)).enumerate()
                    {
                        // Every row is in range and holds whole blocks (checked at construction).
                        let _ = self.dequantize_row(r.start + i, row);
                    }
                    done(r);
                }
                DenseData::F32(v)
            }
        };
        DenseMatrix { rows, cols, data }
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `order[i]`
    /// (llama.cpp's q/k row order, say). `order` must be a permutation of `0..rows`.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self, DenseError> {
        if order.len() != self.rows {
            return Err(DenseError::RowOrder { rows: self.rows, got: order.len() });
        }
        let mut seen = vec![false; self.rows];
        let mut data = AlignedBytes::zeroed(self.bytes());
        let rb = self.row_bytes;
        for (i, &from) in order.iter().enumerate() {
            if from >= self.rows || std::mem::replace(&mut seen[from], true) {
                return Err(DenseError::RowOutOfRange { row: from, rows: self.rows });
            }
            data.as_bytes_mut()[i * rb..(i + 1) * rb].copy_from_slice(self.row(from));
        }
        Ok(Self {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            row_bytes: rb,
            data: Storage::Owned(data),
            float_activations: self.float_activations,
        })
    }

    /// `out[t · rows + r] = Σ_c W[r, c] · x[t · cols + c]` for `m` tokens of `x`, on the active
    /// kernel path. The activations are quantized as the format asks into a buffer kept per
    /// thread, which grows to the largest `m · cols` seen and is then reused: a decode step
    /// allocates nothing.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), DenseError> {
        self.forward_with(KernelPath::active(), x, m, out)
    }

    /// [`DenseLinear::forward`] on a chosen kernel path (the best one if this CPU cannot run
    /// `path`).
    pub fn forward_with(
        &self,
        path: KernelPath,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), DenseError> {
        self.check_io(x.len(), m, out.len())?;
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => {
                scratch.quantize(self.activation_kind(), x, m, self.cols)?;
                self.forward_quantized_with(path, &scratch, out)
            }
            // Re-entered on this thread (a pool worker that picked up another product while
            // waiting): use a buffer of its own.
            Err(_) => {
                let mut own = DenseActivations::new();
                own.quantize(self.activation_kind(), x, m, self.cols)?;
                self.forward_quantized_with(path, &own, out)
            }
        })
    }

    /// The product with activations already quantized (once for all the matrices that read
    /// them): `out[t · rows + r]` for the `a.m()` tokens of `a`.
    pub fn forward_quantized(&self, a: &DenseActivations, out: &mut [f32]) -> Result<(), DenseError> {
        self.forward_quantized_with(KernelPath::active(), a, out)
    }

    /// [`DenseLinear::forward_quantized`] on a chosen kernel path.
    pub fn forward_quantized_with(
        &self,
        path: KernelPath,
        a: &DenseActivations,
        out: &mut [f32],
    ) -> Result<(), DenseError> {
        self.check_activations(a, out.len())?;
        let path = path.or_best();
        let sink = SharedOut::new(out, self.rows);
        let (units, macs) = (self.row_groups(), a.m() * self.rows * self.cols);
        for_ranges(units, macs, parallel_min(a.m()), |groups| self.run_groups(path, a, groups, &sink));
        Ok(())
    }

    /// [`DenseLinear::forward_quantized`] of `N` matrices that read the same activations (q, k
    /// and v; gate and up), in one parallel region.
    pub fn forward_many<const N: usize>(
        mats: [&DenseLinear; N],
        a: &DenseActivations,
        outs: [&mut [f32]; N],
    ) -> Result<(), DenseError> {
        for (w, out) in mats.iter().zip(&outs) {
            w.check_activations(a, out.len())?;
        }
        let path = KernelPath::active().or_best();
        let sinks: [SharedOut<'_, f32>; N] = {
            let mut outs = outs.map(Some);
            std::array::from_fn(|i| {
                let out = outs[i].take().unwrap_or_default();
                SharedOut::new(out, mats[i].rows)
            })
        };
        let groups: [usize; N] = std::array::from_fn(|i| mats[i].row_groups());
        let macs = mats.iter().map(|w| a.m() * w.rows * w.cols).sum();
        for_ranges(groups.iter().sum(), macs, parallel_min(a.m()), |range| {
            // `range` counts the row groups of all matrices one after another.
            let mut first = 0;
            for i in 0..N {
                let (lo, hi) = (range.start.max(first), range.end.min(first + groups[i]));
                if lo < hi {
                    mats[i].run_groups(path, a, lo - first..hi - first, &sinks[i]);
                }
                first += groups[i];
            }
        });
        Ok(())
    }

    fn check_io(&self, x_len: usize, m: usize, out_len: usize) -> Result<(), DenseError> {
        let expected = m.checked_mul(self.cols).ok_or(DenseError::Overflow { rows: m, cols: self.cols })?;
        if x_len != expected {
            return Err(DenseError::InputLength { m, cols: self.cols, expected, got: x_len });
        }
        let expected = m.checked_mul(self.rows).ok_or(DenseError::Overflow { rows: m, cols: self.rows })?;
        if out_len < expected {
            return Err(DenseError::OutputLength { m, rows: self.rows, expected, got: out_len });
        }
        Ok(())
    }

    fn check_activations(&self, a: &DenseActivations, out_len: usize) -> Result<(), DenseError> {
        check_product(self.format, self.activation_kind(), self.rows, self.cols, a, out_len)
    }

    /// Units of parallel work: groups of [`ROW_GROUP`] rows.
    fn row_groups(&self) -> usize {
        self.rows.div_ceil(ROW_GROUP)
    }

    /// Rows of `groups` for every token, on the calling thread.
    fn run_groups(
        &self,
        path: KernelPath,
        a: &DenseActivations,
        groups: Range<usize>,
        out: &SharedOut<'_, f32>,
    ) {
        let rows = groups.start * ROW_GROUP..(groups.end * ROW_GROUP).min(self.rows);
        if self.float_activations {
            // One definition on every path: the decode and the f32 dot product are the same code.
            scalar::run_rows_dequantized(self, a, rows, out);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if path != KernelPath::Scalar && avx2::available() {
            // SAFETY: AVX2, FMA and F16C are available (checked just above).
            unsafe { avx2::run_rows(self, a, rows, out) };
            return;
        }
        #[cfg(target_arch = "aarch64")]
        if path != KernelPath::Scalar {
            neon::run_rows(self, a, rows, out);
            return;
        }
        let _ = path;
        scalar::run_rows(self, a, rows, out);
    }
}

/// Rows a SIMD kernel computes together (one per lane of an 8-lane vector).
pub const ROW_GROUP: usize = 8;

/// That a product of a `[rows, cols]` matrix of `format`, which takes `needed` activations, can
/// read `a` and write `out_len` values.
fn check_product(
    format: DenseFormat,
    needed: ActivationKind,
    rows: usize,
    cols: usize,
    a: &DenseActivations,
    out_len: usize,
) -> Result<(), DenseError> {
    if a.kind() != needed {
        return Err(DenseError::ActivationKind { format, needed, got: a.kind() });
    }
    if a.k() != cols {
        return Err(DenseError::ActivationWidth { expected: cols, got: a.k() });
    }
    let expected = a.m() * rows;
    if out_len < expected {
        return Err(DenseError::OutputLength { m: a.m(), rows, expected, got: out_len });
    }
    Ok(())
}

fn parallel_min(m: usize) -> usize {
    if m == 1 {
        kernels::PARALLEL_MIN_MACS_GEMV
    } else {
        kernels::PARALLEL_MIN_MACS
    }
}

thread_local! {
    /// The activations [`DenseLinear::forward`] quantizes into, one buffer per thread.
    static SCRATCH: RefCell<DenseActivations> = RefCell::new(DenseActivations::new());
}

/// How far a float dot product summed in another order (or with fused multiply-adds) may lie
/// from the scalar reference's sequential sum: each is within `γ_n · Σ|w·x|` of the exact value
/// (`γ_n = n·u / (1 − n·u)`, `u = 2⁻²⁴`), so two of them within twice that. `abs_sum` is
/// `Σ |w_c · x_c|` over the `n` columns.
pub fn float_dot_bound(n: usize, abs_sum: f64) -> f64 {
    let u = f64::from(f32::EPSILON) / 2.0;
    let nu = (n as f64 + 1.0) * u;
    2.0 * nu / (1.0 - nu) * abs_sum
}
