//! Block formats of GGUF tensors: byte layouts, quantizers and dequantizers.
//!
//! Each submodule is one format and follows the byte layout of the engine that defined it
//! (llama.cpp's `ggml-common.h`/`ggml-quants.c`, bitnet.cpp's `ggml-bitnet-mad.cpp`); the
//! layouts are written out in `docs/ternary-formats.md` (the group-scaled types),
//! `shared/docs/ternary-formats.md` and in each module's doc.
//!
//! Conventions:
//! * a dequantizer takes the raw bytes of `n` elements and fills `out[..n]`; it checks that the
//!   byte length is exactly what `n` elements need and never panics on any byte content;
//! * a quantizer takes `n` floats and returns the bytes; `n` must be a multiple of the block;
//! * the ternary formats also give their exact codes in {-1, 0, +1} with the scales
//!   ([`TernaryCodes`]), which the engine repacks into its own kernel layout at load.

pub mod float;
pub mod i2_s;
pub mod k_quants;
pub mod q1_0;
pub mod q2_0;
pub mod q4;
pub mod q8_0;
pub mod tq1_0;
pub mod tq2_0;
mod types;

pub use types::GgmlType;

/// What went wrong converting a tensor between a block format and floats or codes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormatError {
    #[error("{format}: {n} elements is not a multiple of the block size {block}")]
    NotBlockMultiple { format: GgmlType, n: usize, block: usize },
    #[error("{format}: {n} elements need {expected} bytes, got {got}")]
    ByteLength { format: GgmlType, n: usize, expected: usize, got: usize },
    #[error("{format}: output buffer holds {got} elements, need {n}")]
    OutputLength { format: GgmlType, n: usize, got: usize },
    #[error("{format}: element {index} has code {code}, which is not a ternary value")]
    NotTernary { format: GgmlType, index: usize, code: i32 },
    #[error("{format}: element {index} has code {code}, but this format holds only -1 and +1 (no zero)")]
    NotSign { format: GgmlType, index: usize, code: i32 },
    #[error("{format}: {what} count {got} does not match the {expected} the codes need")]
    ScaleCount { format: GgmlType, what: &'static str, expected: usize, got: usize },
    #[error("{format}: {n} elements overflow the size computation")]
    Overflow { format: GgmlType, n: usize },
    #[error("{format}: {operation} is not implemented for this format")]
    Unsupported { format: GgmlType, operation: &'static str },
}

/// Exact ternary weights read out of a ternary format: codes in {-1, 0, +1} and their scales.
///
/// Element `i` is worth `codes[i] as f32 * scales[i / block_len]`. TQ1_0 and TQ2_0 have one
/// scale per 256 elements, Q1_0, PQ2_0 and PTQ1_0 one per 128, Q2_0 one per 64; I2_S has one
/// scale for the whole tensor (`block_len == codes.len()`). Q1_0's codes are never 0.
#[derive(Debug, Clone, PartialEq)]
pub struct TernaryCodes {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub block_len: usize,
}

impl TernaryCodes {
    /// The scale of element `index`.
    pub fn scale_of(&self, index: usize) -> f32 {
        let block = index.checked_div(self.block_len).unwrap_or(0);
        self.scales.get(block).copied().unwrap_or(0.0)
    }

    /// The float value of every element, `code * scale`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes.iter().enumerate().map(|(i, &c)| f32::from(c) * self.scale_of(i)).collect()
    }
}

/// Checks `n` against the block and `bytes` against the size of `n` elements; returns the
/// number of blocks.
pub(crate) fn check_blocks(
    format: GgmlType,
    n: usize,
    block: usize,
    block_bytes: usize,
    got: usize,
) -> Result<usize, FormatError> {
    if !n.is_multiple_of(block) {
        return Err(FormatError::NotBlockMultiple { format, n, block });
    }
    let blocks = n / block;
    let expected = blocks.checked_mul(block_bytes).ok_or(FormatError::Overflow { format, n })?;
    if expected != got {
        return Err(FormatError::ByteLength { format, n, expected, got });
    }
    Ok(blocks)
}

/// Checks that `n` is a multiple of `block`; returns the number of blocks.
pub(crate) fn check_multiple(format: GgmlType, n: usize, block: usize) -> Result<usize, FormatError> {
    if !n.is_multiple_of(block) {
        return Err(FormatError::NotBlockMultiple { format, n, block });
    }
    Ok(n / block)
}

pub(crate) fn check_out(format: GgmlType, n: usize, got: usize) -> Result<(), FormatError> {
    if got < n {
        return Err(FormatError::OutputLength { format, n, got });
    }
    Ok(())
}

/// Reads a little-endian f16 at `at` (callers index inside a checked block).
#[inline]
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    float::f16_bits_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// Dequantizes `n` elements of `format` from `bytes` into `out[..n]`.
pub fn dequantize_into(format: GgmlType, bytes: &[u8], n: usize, out: &mut [f32]) -> Result<(), FormatError> {
    check_out(format, n, out.len())?;
    let out = &mut out[..n];
    match format {
        GgmlType::F32 => float::f32_from_bytes(bytes, out),
        GgmlType::F16 => float::dequantize_f16(bytes, out),
        GgmlType::BF16 => float::dequantize_bf16(bytes, out),
        GgmlType::Q8_0 => q8_0::dequantize(bytes, out),
        GgmlType::Q4_0 => q4::dequantize_q4_0(bytes, out),
        GgmlType::Q4_1 => q4::dequantize_q4_1(bytes, out),
        GgmlType::Q4_K => k_quants::dequantize_q4_k(bytes, out),
        GgmlType::Q6_K => k_quants::dequantize_q6_k(bytes, out),
        GgmlType::TQ1_0 | GgmlType::PTQ1_0 => tq1_0::dequantize_base3(format, bytes, out),
        GgmlType::TQ2_0 => tq2_0::dequantize(bytes, out),
        GgmlType::Q1_0 => q1_0::dequantize(bytes, out),
        GgmlType::Q2_0 | GgmlType::PQ2_0 => q2_0::dequantize(format, bytes, out),
        GgmlType::I2_S => i2_s::dequantize(bytes, out),
        other => Err(FormatError::Unsupported { format: other, operation: "dequantization" }),
    }
}

/// Whether [`dequantize`] handles `format`.
pub fn can_dequantize(format: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        format,
        F32 | F16
            | BF16
            | Q8_0
            | Q4_0
            | Q4_1
            | Q4_K
            | Q6_K
            | TQ1_0
            | TQ2_0
            | Q1_0
            | Q2_0
            | PQ2_0
            | PTQ1_0
            | I2_S
    )
}

/// Dequantizes `n` elements of `format` into a new vector.
pub fn dequantize(format: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, FormatError> {
    // Refuse before allocating the output: an unsupported type, or bytes that are not
    // exactly what `n` elements take.
    if !can_dequantize(format) {
        return Err(FormatError::Unsupported { format, operation: "dequantization" });
    }
    match format.tensor_bytes(&[n as u64]) {
        Some(expected) if expected == bytes.len() as u64 => {}
        Some(expected) => {
            return Err(FormatError::ByteLength { format, n, expected: expected as usize, got: bytes.len() })
        }
        None => {
            let block = match format {
                GgmlType::I2_S => i2_s::CHUNK,
                _ => format.block_geometry().0 as usize,
            };
            return Err(FormatError::NotBlockMultiple { format, n, block });
        }
    }
    let mut out = vec![0.0f32; n];
    dequantize_into(format, bytes, n, &mut out)?;
    Ok(out)
}

/// Quantizes `x` to `format`, for the formats that have a quantizer here.
pub fn quantize(format: GgmlType, x: &[f32]) -> Result<Vec<u8>, FormatError> {
    match format {
        GgmlType::F32 => Ok(float::f32_to_bytes(x)),
        GgmlType::F16 => Ok(float::quantize_f16(x)),
        GgmlType::BF16 => Ok(float::quantize_bf16(x)),
        GgmlType::Q8_0 => q8_0::quantize(x),
        GgmlType::Q6_K => k_quants::quantize_q6_k(x),
        GgmlType::Q4_K => k_quants::quantize_q4_k(x),
        GgmlType::TQ1_0 | GgmlType::PTQ1_0 => tq1_0::quantize_base3(format, x),
        GgmlType::TQ2_0 => tq2_0::quantize(x),
        GgmlType::Q1_0 => q1_0::quantize(x),
        GgmlType::Q2_0 | GgmlType::PQ2_0 => q2_0::quantize(format, x),
        GgmlType::I2_S => i2_s::quantize(x),
        other => Err(FormatError::Unsupported { format: other, operation: "quantization" }),
    }
}

/// The exact ternary codes and scales of `n` elements of a ternary format.
pub fn ternary_codes(format: GgmlType, bytes: &[u8], n: usize) -> Result<TernaryCodes, FormatError> {
    match format {
        GgmlType::TQ1_0 | GgmlType::PTQ1_0 => tq1_0::extract_base3(format, bytes, n),
        GgmlType::TQ2_0 => tq2_0::extract(bytes, n),
        GgmlType::Q1_0 => q1_0::extract(bytes, n),
        GgmlType::Q2_0 | GgmlType::PQ2_0 => q2_0::extract(format, bytes, n),
        GgmlType::I2_S => i2_s::extract(bytes, n),
        other => Err(FormatError::Unsupported { format: other, operation: "ternary code extraction" }),
    }
}

/// Writes exact codes with one scale per block of a group-scaled ternary format (TQ1_0, TQ2_0,
/// Q1_0, Q2_0, PQ2_0, PTQ1_0: `scales.len() == codes.len() / format.ternary_group()`), scales
/// stored as f16. Codes the format cannot hold (a 0 in Q1_0, anything outside {-1, 0, +1}) are
/// an error naming the element.
pub fn pack_ternary(format: GgmlType, codes: &[i8], scales: &[f32]) -> Result<Vec<u8>, FormatError> {
    match format {
        GgmlType::TQ1_0 | GgmlType::PTQ1_0 => tq1_0::pack_base3(format, codes, scales),
        GgmlType::TQ2_0 => tq2_0::pack(codes, scales),
        GgmlType::Q1_0 => q1_0::pack(codes, scales),
        GgmlType::Q2_0 | GgmlType::PQ2_0 => q2_0::pack(format, codes, scales),
        other => {
            Err(FormatError::Unsupported { format: other, operation: "packing group-scaled ternary codes" })
        }
    }
}
