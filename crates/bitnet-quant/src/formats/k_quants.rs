//! K-quants with 256-weight super-blocks: Q4_K and Q6_K (quantize, dequantize).
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
//! The quantizers follow `quantize_row_q6_K_ref` and `quantize_row_q4_K_ref` (the ones
//! `llama-quantize` uses without an importance matrix), so that a file written here matches one
//! written by llama.cpp.

use rayon::prelude::*;

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
    // Blocks are independent: encoded in parallel (a 2B-4T head is 1.3 million of them).
    out.par_chunks_exact_mut(Q6_K_BLOCK_BYTES).zip(x.par_chunks_exact(QK_K)).for_each(|(y, xb)| {
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
            return;
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
    });
    Ok(out)
}

/// Asymmetric quantization of a sub-block to levels `0..=nmax` with a scale and a min (the value
/// is `scale · l − min`, `min ≥ 0`): the first guess spans `[min(x, 0), max(x)]`, then `nstep + 1`
/// candidate inverse scales `(rmin + rdelta · is + nmax) / (max − min)`, each refitting scale and
/// min by weighted least squares, keep the one of least `weights`-weighted squared error (ggml's
/// `make_qkx2_quants` with `use_mad = false`). Returns `(scale, min)`.
fn make_qkx2_quants(
    nmax: u8,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (0.0f32, 0.0f32);
    for (&v, &w) in x.iter().zip(weights) {
        min = min.min(v);
        max = max.max(v);
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let level =
        |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, i32::from(nmax)) as u8;
    let error = |levels: &[u8], scale: f32, min: f32| -> f32 {
        x.iter()
            .zip(weights)
            .zip(levels)
            .map(|((&v, &w), &l)| w * (scale * f32::from(l) + min - v).powi(2))
            .sum()
    };
    let mut iscale = f32::from(nmax) / (max - min);
    let mut scale = 1.0 / iscale;
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = level(iscale, v, min);
    }
    let mut best = error(levels, scale, min);
    // Sub-blocks are at most 32 values (Q4_K's): the trial levels live on the stack.
    let mut trial_buf = [0u8; 32];
    let trial = &mut trial_buf[..x.len()];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + f32::from(nmax)) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((t, &v), &w) in trial.iter_mut().zip(x).zip(weights) {
            *t = level(iscale, v, min);
            let l = f32::from(*t);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let err = error(trial, this_scale, this_min);
            if err < best {
                levels.copy_from_slice(trial);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Encodes `x` (a multiple of 256 elements) as Q4_K: per 32-weight sub-block a scale and a min
/// fitted with weights `rms(sub-block) + |x|`, both quantized to 6 bits against the
/// super-block's largest (`d`, `dmin` in f16), then each weight's 4-bit level recomputed from the
/// stored scale and min.
pub fn quantize_q4_k(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    let blocks = check_multiple(GgmlType::Q4_K, x.len(), QK_K)?;
    let mut out = vec![0u8; blocks * Q4_K_BLOCK_BYTES];
    // Blocks are independent: encoded in parallel (a 2B-4T head is 1.3 million of them).
    out.par_chunks_exact_mut(Q4_K_BLOCK_BYTES).zip(x.par_chunks_exact(QK_K)).for_each(|(y, xb)| {
        let mut levels = [0u8; QK_K];
        let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
        for s in 0..8 {
            let sub = &xb[32 * s..32 * s + 32];
            let rms = (sub.iter().fold(0.0f32, |acc, v| acc + v * v) / 32.0).sqrt();
            let weights: [f32; 32] = std::array::from_fn(|i| rms + sub[i].abs());
            (scales[s], mins[s]) =
                make_qkx2_quants(15, sub, &weights, &mut levels[32 * s..32 * s + 32], -1.0, 0.1, 20);
        }
        let max_scale = scales.iter().fold(0.0f32, |m, &v| m.max(v));
        let max_min = mins.iter().fold(0.0f32, |m, &v| m.max(v));
        let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let packed = &mut y[4..16];
        for s in 0..8 {
            let ls = nearest_int(inv_scale * scales[s]).clamp(0, 63) as u8;
            let lm = nearest_int(inv_min * mins[s]).clamp(0, 63) as u8;
            // The packing `scale_min_k4` reads back.
            if s < 4 {
                packed[s] = ls;
                packed[s + 4] = lm;
            } else {
                packed[s + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
                packed[s - 4] |= (ls >> 4) << 6;
                packed[s] |= (lm >> 4) << 6;
            }
        }
        y[0..2].copy_from_slice(&float::f32_to_f16_bits(max_scale / 63.0).to_le_bytes());
        y[2..4].copy_from_slice(&float::f32_to_f16_bits(max_min / 63.0).to_le_bytes());
        let (d, dmin) = (f16_at(y, 0), f16_at(y, 2));
        for s in 0..8 {
            let (sc, m) = scale_min_k4(s, &y[4..16]);
            let step = d * f32::from(sc);
            if step == 0.0 {
                continue;
            }
            let offset = dmin * f32::from(m);
            for i in 32 * s..32 * s + 32 {
                levels[i] = nearest_int((xb[i] + offset) / step).clamp(0, 15) as u8;
            }
        }
        // Each 64-weight chunk: sub-block 2c in the low nibbles, 2c + 1 in the high ones.
        for c in 0..4 {
            for l in 0..32 {
                y[16 + 32 * c + l] = levels[64 * c + l] | (levels[64 * c + 32 + l] << 4);
            }
        }
    });
    Ok(out)
}
