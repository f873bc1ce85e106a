//! F32, F16 and BF16 tensors: little-endian IEEE values, one per element.
//!
//! Rounding from f32 is to nearest, ties to even, as ggml's `GGML_FP32_TO_FP16` (F16C) and
//! `GGML_FP32_TO_BF16` do; NaN stays NaN.

use super::{FormatError, GgmlType};
use half::{bf16, f16};

/// The f32 value of f16 bits.
#[inline]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// The f16 bits nearest to `x`.
#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// The f32 value of bf16 bits (exact: bf16 is the top half of an f32).
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    bf16::from_bits(bits).to_f32()
}

/// The bf16 bits nearest to `x`.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// Decodes little-endian f32 values into `out`.
pub fn f32_from_bytes(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    super::check_blocks(GgmlType::F32, out.len(), 1, 4, bytes.len())?;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// Encodes f32 values as little-endian bytes.
pub fn f32_to_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes little-endian f16 values into `out`.
pub fn dequantize_f16(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    super::check_blocks(GgmlType::F16, out.len(), 1, 2, bytes.len())?;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
    Ok(())
}

/// Encodes f32 values as little-endian f16.
pub fn quantize_f16(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|&v| f32_to_f16_bits(v).to_le_bytes()).collect()
}

/// Decodes little-endian bf16 values into `out`.
pub fn dequantize_bf16(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    super::check_blocks(GgmlType::BF16, out.len(), 1, 2, bytes.len())?;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
    Ok(())
}

/// Encodes f32 values as little-endian bf16.
pub fn quantize_bf16(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes()).collect()
}
