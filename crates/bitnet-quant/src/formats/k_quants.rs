//! K-quants with 256-weight super-blocks: Q4_K (dequantize) and Q6_K (quantize, dequantize).
//!
//! * Q4_K, 144 bytes: `d` (f16), `dmin` (f16), `scales[12]` (eight 6-bit scales and eight
//!   6-bit mins, packed), `qs[128]`. Sub-block `s` (32 weights) is
//!   `x = d*sc[s]*q - dmin*m[s]`. Each 64-weight chunk `c` takes 32 bytes of `qs`: the low
//!   nibbles are sub-block `2c`, the high nibbles sub-block `2c+1`. Packing of the 6-bit values
//!   (`get_scale_min_k4`): for `j < 4`, `sc = scales[j] & 63`, `m = scales[j+4] & 63`; for
//!   `j >= 4`, `sc = (scales[j+4] & 15) | (scales[j-4] >> 6) << 4` and
//!   `m = (scales[j+4] >> 4) | (scales[j] >> 6) << 4`.
//! * Q6_K, 210 bytes: `ql[128]` (low 4 bits), `qh[64]` (high 2 bits), `scales[16]` (`i8`, one
//!   per 16 weights), `d` (f16); `x = d * scales[s] * (q - 32)`. In each 128-weight half `h`
//!   (`ql` from `64h`, `qh` from `32h`), for `l < 32`: element `l` is `ql[l] & 15` with
//!   `qh[l] >> 0 & 3`, `l+32` is `ql[l+32] & 15` with `qh[l] >> 2 & 3`, `l+64` is
//!   `ql[l] >> 4` with `qh[l] >> 4 & 3`, and `l+96` is `ql[l+32] >> 4` with `qh[l] >> 6 & 3`.
//!
//! The Q6_K quantizer follows `quantize_row_q6_K_ref` (the one `llama-quantize` uses without
//! an importance matrix), so that a file written here matches one written by llama.cpp.

use super::{check_blocks, check_multiple, f16_at, float, FormatError, GgmlType};

pub const QK_K: usize = 256;
pub const Q4_K_BLOCK_BYTES: usize = 144;
pub const Q6_K_BLOCK_BYTES: usize = 210;

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K `scales` array.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Decodes Q4_K bytes into `out` (`out.len()` elements).
pub fn dequantize_q4_k(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    check_blocks(GgmlType::Q4_K, out.len(), QK_K, Q4_K_BLOCK_BYTES, bytes.len())?;
    for (blk, o) in bytes.chunks_exact(Q4_K_BLOCK_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(blk, 0);
        let dmin = f16_at(blk, 2);
        let scales = &blk[4..16];
        let qs = &blk[16..];
        for (c, (q, y)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = scale_min_k4(2 * c, scales);
            let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
            let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
            let (lo, hi) = y.split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * f32::from(q[l] & 0x0F) - min1;
                hi[l] = d2 * f32::from(q[l] >> 4) - min2;
            }
        }
    }
    Ok(())
}

/// Decodes Q6_K bytes into `out` (`out.len()` elements).
pub fn dequantize_q6_k(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    check_blocks(GgmlType::Q6_K, out.len(), QK_K, Q6_K_BLOCK_BYTES, bytes.len())?;
    for (blk, o) in bytes.chunks_exact(Q6_K_BLOCK_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(blk, 208);
        for h in 0..2 {
            let ql = &blk[64 * h..64 * h + 64];
            let qh = &blk[128 + 32 * h..128 + 32 * h + 32];
            let sc = &blk[192 + 8 * h..192 + 8 * h + 8];
            let y = &mut o[128 * h..128 * h + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                let s = |k: usize| d * f32::from(sc[k] as i8);
                y[l] = s(is) * q1 as f32;
                y[l + 32] = s(is + 2) * q2 as f32;
                y[l + 64] = s(is + 4) * q3 as f32;
                y[l + 96] = s(is + 6) * q4 as f32;
            }
        }
    }
    Ok(())
}

/// Round to nearest, ties to even: ggml's `nearest_int` (an f32 add of 1.5 * 2^23).
#[inline]
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// Below this a group counts as all zeros (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Symmetric quantization of a group to integers in `[-nmax, nmax)`, stored as `l + nmax` in
/// `levels`, with the scale chosen to minimize the x²-weighted squared error over 19 candidate
/// inverse scales around `-nmax / max` (ggml's `make_qx_quants` with `rmse_type = 1`).
fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [u8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = quant(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (lv, &v) in levels.iter_mut().zip(x) {
        *lv = (quant(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (lv, &v) in levels.iter_mut().zip(x) {
                *lv = (quant(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Encodes `x` (a multiple of 256 elements) as Q6_K.
pub fn quantize_q6_k(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    let blocks = check_multiple(GgmlType::Q6_K, x.len(), QK_K)?;
    let mut out = vec![0u8; blocks * Q6_K_BLOCK_BYTES];
    for (xb, y) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q6_K_BLOCK_BYTES)) {
        let mut levels = [0u8; QK_K];
        let mut scales = [0.0f32; QK_K / 16];
        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        for (ib, s) in scales.iter_mut().enumerate() {
            let r = 16 * ib..16 * ib + 16;
            *s = make_qx_quants(32, &xb[r.clone()], &mut levels[r]);
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = *s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            // All-zero block: every byte zero, d = 0.
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d_bits = float::f32_to_f16_bits(1.0 / iscale);
        let d = float::f16_bits_to_f32(d_bits);
        y[208..210].copy_from_slice(&d_bits.to_le_bytes());
        let mut qscales = [0i8; QK_K / 16];
        for (q, &s) in qscales.iter_mut().zip(&scales) {
            *q = nearest_int(iscale * s).clamp(-128, 127) as i8;
        }
        for (j, &qs) in qscales.iter().enumerate() {
            y[192 + j] = qs as u8;
            let dd = d * f32::from(qs);
            if dd == 0.0 {
                continue;
            }
            for i in 16 * j..16 * j + 16 {
                levels[i] = (nearest_int(xb[i] / dd).clamp(-32, 31) + 32) as u8;
            }
        }
        for h in 0..2 {
            let lv = &levels[128 * h..128 * h + 128];
            for l in 0..32 {
                y[64 * h + l] = (lv[l] & 0x0F) | ((lv[l + 64] & 0x0F) << 4);
                y[64 * h + l + 32] = (lv[l + 32] & 0x0F) | ((lv[l + 96] & 0x0F) << 4);
                y[128 + 32 * h + l] = (lv[l] >> 4)
                    | ((lv[l + 32] >> 4) << 2)
                    | ((lv[l + 64] >> 4) << 4)
                    | ((lv[l + 96] >> 4) << 6);
            }
        }
    }
    Ok(out)
}
