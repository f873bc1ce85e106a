//! I2_S (bitnet.cpp, x86 layout): ternary weights at 2 bits, one f32 scale per tensor.
//!
//! The flattened (row-major) tensor is cut into 128-weight chunks `c[0..128]` of codes
//! `q + 1 ∈ {0, 1, 2}`; each chunk takes 32 bytes with
//! `byte[p] = c[p] << 6 | c[32+p] << 4 | c[64+p] << 2 | c[96+p]`. After the `n/4` packed bytes
//! comes the scale as a little-endian f32, zero-padded to 32 bytes: `n/4 + 32` bytes in all.
//! Value: `(code - 1) * scale`.
//!
//! `n` must be a multiple of 128: bitnet.cpp's packer drops the tail of a partial chunk.
//! Not covered: the ARM build's 64-weight chunks and the fork's alternative 1x4
//! row-interleaved layout (`#else` of `ACT_PARALLEL`); neither is marked in the file.

use super::{check_multiple, FormatError, GgmlType, TernaryCodes};

pub const CHUNK: usize = 128;
pub const CHUNK_BYTES: usize = 32;
/// The bytes after the packed codes: the f32 scale and its zero padding.
pub const TAIL_BYTES: usize = 32;

/// Bytes of an I2_S tensor of `n` elements (`n` a multiple of 128).
pub fn tensor_bytes(n: usize) -> usize {
    n / 4 + TAIL_BYTES
}

/// Checks the element count and byte length; returns the number of chunks.
fn check(n: usize, got: usize) -> Result<usize, FormatError> {
    let chunks = check_multiple(GgmlType::I2_S, n, CHUNK)?;
    let expected = tensor_bytes(n);
    if got != expected {
        return Err(FormatError::ByteLength { format: GgmlType::I2_S, n, expected, got });
    }
    Ok(chunks)
}

/// The element of a chunk held in byte `p`, field `g` (g = 0 in bits 6..8).
#[inline]
fn element_of(p: usize, g: usize) -> usize {
    32 * g + p
}

/// The tensor scale stored after the packed codes.
pub fn scale(bytes: &[u8], n: usize) -> Result<f32, FormatError> {
    check(n, bytes.len())?;
    let at = n / 4;
    Ok(f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]))
}

/// Decodes I2_S bytes into `out` (`out.len()` elements). The code 3, which the packer never
/// writes, reads as `2 * scale` like the fork's kernels (code minus one).
pub fn dequantize(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    let n = out.len();
    let s = scale(bytes, n)?;
    for (chunk, o) in bytes[..n / 4].chunks_exact(CHUNK_BYTES).zip(out.chunks_exact_mut(CHUNK)) {
        for (p, &b) in chunk.iter().enumerate() {
            for g in 0..4 {
                let code = i32::from((b >> (6 - 2 * g)) & 3);
                o[element_of(p, g)] = (code - 1) as f32 * s;
            }
        }
    }
    Ok(())
}

/// The exact codes and the tensor scale of I2_S bytes holding `n` elements.
pub fn extract(bytes: &[u8], n: usize) -> Result<TernaryCodes, FormatError> {
    let s = scale(bytes, n)?;
    let mut codes = vec![0i8; n];
    extract_codes(&bytes[..n / 4], &mut codes)?;
    Ok(TernaryCodes { codes, scales: vec![s], block_len: n })
}

/// The codes of whole chunks: `packed` is a run of 32-byte chunks of the packed part (without
/// the scale), `out` their `4 · packed.len()` elements. A loader decodes a tensor's rows a few
/// at a time this way when they are whole chunks; an error's index counts from the run's start.
pub fn extract_codes(packed: &[u8], out: &mut [i8]) -> Result<(), FormatError> {
    check_multiple(GgmlType::I2_S, out.len(), CHUNK)?;
    if packed.len() != out.len() / 4 {
        return Err(FormatError::ByteLength {
            format: GgmlType::I2_S,
            n: out.len(),
            expected: out.len() / 4,
            got: packed.len(),
        });
    }
    for (ci, (chunk, c)) in packed.chunks_exact(CHUNK_BYTES).zip(out.chunks_exact_mut(CHUNK)).enumerate() {
        for (p, &b) in chunk.iter().enumerate() {
            for g in 0..4 {
                let code = (b >> (6 - 2 * g)) & 3;
                let e = element_of(p, g);
                if code == 3 {
                    return Err(FormatError::NotTernary {
                        format: GgmlType::I2_S,
                        index: ci * CHUNK + e,
                        code: 2,
                    });
                }
                c[e] = code as i8 - 1;
            }
        }
    }
    Ok(())
}

/// Packs exact codes in {-1, 0, +1} (a multiple of 128) with the tensor scale.
pub fn pack(codes: &[i8], scale: f32) -> Result<Vec<u8>, FormatError> {
    let n = codes.len();
    check_multiple(GgmlType::I2_S, n, CHUNK)?;
    let mut out = vec![0u8; tensor_bytes(n)];
    for (ci, (c, y)) in codes.chunks_exact(CHUNK).zip(out[..n / 4].chunks_exact_mut(CHUNK_BYTES)).enumerate()
    {
        for (p, byte) in y.iter_mut().enumerate() {
            for g in 0..4 {
                let e = element_of(p, g);
                let v = c[e];
                if !(-1..=1).contains(&v) {
                    return Err(FormatError::NotTernary {
                        format: GgmlType::I2_S,
                        index: ci * CHUNK + e,
                        code: i32::from(v),
                    });
                }
                *byte |= ((v + 1) as u8) << (6 - 2 * g);
            }
        }
    }
    out[n / 4..n / 4 + 4].copy_from_slice(&scale.to_le_bytes());
    Ok(out)
}

/// Encodes `x` as I2_S like bitnet.cpp's `quantize_i2_s`: the scale is `max|x|` over the whole
/// tensor and each weight becomes its sign (0 when `|x| < 1e-6`). This assumes `x` is already
/// ternary times one scale, as BitNet checkpoints are; it does not round `x / scale`.
pub fn quantize(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    check_multiple(GgmlType::I2_S, x.len(), CHUNK)?;
    let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let codes: Vec<i8> = x
        .iter()
        .map(|&v| {
            if v.abs() < 1e-6 || v.is_nan() {
                0
            } else if v > 0.0 {
                1
            } else {
                -1
            }
        })
        .collect();
    pack(&codes, scale)
}
