//! Group-scaled ternary weights: one multiplier per (row, group of `G` consecutive columns),
//! the scales of llama.cpp's TQ1_0/TQ2_0 (G = 256), Q1_0 (128), Q2_0 (64) and PrismML's PQ2_0
//! and PTQ1_0 (128).
//!
//! The product, for a token with int8 activations `x` and scale `s_a`, is
//!
//! ```text
//! P[r, g] = Σ_{c ∈ group g} t[r, c] · x[c]          exact, in i32
//! y[r]    = scale( Σ_g d[r, g] · (P[r, g] as f32), s_a )
//! ```
//!
//! with the sum over groups taken in f32 in the order g = 0, 1, 2, … (a multiply, then an add:
//! no fused multiply-add), and `scale` the matrix's [`crate::WeightScale`]. Every kernel path
//! computes the same `P` (they are integers) and combines them in this one piece of portable
//! code, so every path gives the same bits. |P| ≤ 256 · 128 is exact in f32.
//!
//! The kernels give, per row tile (8 rows) and token, `U[g, ri] = Σ_{c ∈ g} u · x` over the
//! stored codes `u = t + 1 ∈ {0, 1, 2}`; the combination subtracts the group's activation sum,
//! `P = U − Σ_{c ∈ g} x[c]` (exact), which [`QuantizedActivations`] keeps per 32 columns. The
//! groups align with the packed layout: a 256-column block holds `256 / G` whole groups, and the
//! 2-bit field `s` of its byte `j` is column `64·s + j`, so every group is a run of whole fields
//! (G ≥ 64) or of half fields (G = 32).

use std::ops::Range;

use crate::kernels::KernelPath;
use crate::layout::{padded_cols, PackedTernary, BLOCK_COLS, ROW_TILE};
use crate::{QuantError, QuantizedActivations};

/// The group sizes the kernels support: every group lies inside one 256-column block.
pub const GROUP_SIZES: [usize; 4] = [32, 64, 128, 256];

/// Columns per activation sum kept by [`QuantizedActivations`] (the smallest group).
pub const SUM_COLS: usize = 32;

/// One f32 multiplier per (row, group of [`GroupScales::group`] columns).
///
/// Stored tile by tile, as the product reads them: for row tile `g`, `groups` runs of 8 scales,
/// one per row of the tile (rows past the matrix have scale 0).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupScales {
    group: usize,
    rows: usize,
    /// Groups per row: `cols.div_ceil(group)` (the last one may be partial).
    groups: usize,
    tiled: Vec<f32>,
}

impl GroupScales {
    /// Scales given row-major, `row_major[r · groups + g]` for the `groups = cols.div_ceil(group)`
    /// groups of each of `rows` rows. `group` must be one of [`GROUP_SIZES`].
    pub fn new(group: usize, rows: usize, cols: usize, row_major: &[f32]) -> Result<Self, QuantError> {
        if !GROUP_SIZES.contains(&group) {
            return Err(QuantError::Shape(format!(
                "a group of {group} columns is not one of the supported sizes {GROUP_SIZES:?}"
            )));
        }
        let groups = cols.div_ceil(group);
        if rows.checked_mul(groups) != Some(row_major.len()) {
            return Err(QuantError::Shape(format!(
                "{} group scales are not one per (row, {group}-column group) of a [{rows}, {cols}] matrix \
                 ({rows} × {groups})",
                row_major.len()
            )));
        }
        let tiles = rows.div_ceil(ROW_TILE);
        let mut tiled = vec![0.0f32; tiles * groups * ROW_TILE];
        for (r, row) in row_major.chunks_exact(groups.max(1)).enumerate().take(rows) {
            let (g, ri) = (r / ROW_TILE, r % ROW_TILE);
            for (gi, &d) in row.iter().enumerate() {
                tiled[(g * groups + gi) * ROW_TILE + ri] = d;
            }
        }
        Ok(Self { group, rows, groups, tiled })
    }

    /// Columns per group.
    pub fn group(&self) -> usize {
        self.group
    }
    /// Groups per row (the last one may be partial).
    pub fn groups_per_row(&self) -> usize {
        self.groups
    }
    /// The scales row-major, `[rows, groups_per_row]`.
    pub fn to_row_major(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.groups];
        for (r, row) in out.chunks_exact_mut(self.groups.max(1)).enumerate().take(self.rows) {
            let (g, ri) = (r / ROW_TILE, r % ROW_TILE);
            for (gi, d) in row.iter_mut().enumerate() {
                *d = self.tiled[(g * self.groups + gi) * ROW_TILE + ri];
            }
        }
        out
    }
    /// Bytes the scales take.
    pub fn bytes(&self) -> usize {
        self.tiled.len() * 4
    }
    /// The scales of row tile `g`: `groups` runs of 8.
    pub(crate) fn tile(&self, g: usize) -> &[f32] {
        let len = self.groups * ROW_TILE;
        &self.tiled[g * len..(g + 1) * len]
    }
}

/// Groups of the padded row, which the kernels compute partials for.
pub(crate) fn padded_groups(cols: usize, group: usize) -> usize {
    padded_cols(cols) / group
}

/// For each row tile `g` of `tiles`: `U[gi · 8 + ri] = Σ_{c ∈ group gi} u[8g + ri, c] · x[c]`
/// (stored codes `u ∈ {0, 1, 2}`) for every group of the padded rows, written into `part` and
/// handed to `f(g, part)`, on `path` (the scalar kernel where `path` has no group kernel of its
/// own; all give the same integers). One dispatch for the whole range: `f` is inlined into the
/// kernel's loop.
pub(crate) fn tiles_group_sums<F: FnMut(usize, &[i32])>(
    path: KernelPath,
    w: &PackedTernary,
    tiles: Range<usize>,
    xr: &[i8],
    group: usize,
    part: &mut [i32],
    f: F,
) {
    assert!(xr.len() >= w.blocks() * BLOCK_COLS && part.len() >= padded_groups(w.cols(), group) * ROW_TILE);
    assert!(tiles.end <= w.tiles());
    macro_rules! by_group {
        ($($f:ident)::+) => {
            match group {
                32 => $($f)::+::<32, F>(w, tiles, xr, part, f),
                64 => $($f)::+::<64, F>(w, tiles, xr, part, f),
                128 => $($f)::+::<128, F>(w, tiles, xr, part, f),
                _ => $($f)::+::<256, F>(w, tiles, xr, part, f),
            }
        };
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass only paths whose CPU features `is_available` confirmed.
        KernelPath::Avx2 => unsafe { by_group!(crate::kernels::avx2::ternary_tiles_group_sums) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Bw => unsafe { by_group!(crate::kernels::avx512::ternary_tiles_group_sums_bw) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Vnni => unsafe { by_group!(crate::kernels::avx512::ternary_tiles_group_sums_vnni) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonPlain => unsafe { by_group!(crate::kernels::neon::ternary_tiles_group_sums_plain) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        KernelPath::NeonDotprod => unsafe { by_group!(crate::kernels::neon::ternary_tiles_group_sums_dot) },
        _ => by_group!(crate::kernels::scalar::ternary_tiles_group_sums),
    }
}

/// For each row tile `g` of `tiles`: the tile's outputs before the weight scale,
/// [`combine_tile`] of its group sums with the token's group activation sums `xs` (one per real
/// group) and the scales `d`, handed to `f(g, values)`. The AVX-512 kernels combine inside
/// the kernel (the same operations in the same order: the same bits; a Q2_0 model decoded
/// 0.95–1.28× as fast, median 1.09×, in seven alternating rounds); the others go through
/// [`tiles_group_sums`] into `part` and [`combine_tile`] (the AVX2 kernel, whose sums already
/// fill its registers, ran at 0.84–0.93× with the combination inside).
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiles_group_combined<F: FnMut(usize, [f32; ROW_TILE])>(
    path: KernelPath,
    w: &PackedTernary,
    tiles: Range<usize>,
    xr: &[i8],
    xs: &[i32],
    d: &GroupScales,
    part: &mut [i32],
    mut f: F,
) {
    let group = d.group();
    assert!(xr.len() >= w.blocks() * BLOCK_COLS && tiles.end <= w.tiles());
    assert!(xs.len() == d.groups && d.tiled.len() >= w.tiles() * d.groups * ROW_TILE);
    #[cfg(target_arch = "x86_64")]
    macro_rules! by_group {
        ($($f:ident)::+) => {
            match group {
                32 => $($f)::+::<32, F>(w, tiles, xr, xs, d, f),
                64 => $($f)::+::<64, F>(w, tiles, xr, xs, d, f),
                128 => $($f)::+::<128, F>(w, tiles, xr, xs, d, f),
                _ => $($f)::+::<256, F>(w, tiles, xr, xs, d, f),
            }
        };
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass only paths whose CPU features `is_available` confirmed.
        KernelPath::Avx512Bw => unsafe { by_group!(crate::kernels::avx512::ternary_tiles_group_combined_bw) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx512Vnni => unsafe {
            by_group!(crate::kernels::avx512::ternary_tiles_group_combined_vnni)
        },
        _ => tiles_group_sums(path, w, tiles, xr, group, part, |g, part| {
            f(g, combine_tile(part, xs, d.tile(g)))
        }),
    }
}

/// The activation sum of each of the first `out.len()` groups of token `t`.
pub(crate) fn group_x_sums(x: &QuantizedActivations, t: usize, group: usize, out: &mut [i32]) {
    let per = group / SUM_COLS;
    for (o, s) in out.iter_mut().zip(x.sums32(t).chunks(per)) {
        *o = s.iter().sum();
    }
}

/// `acc[ri] = Σ_g d[g, ri] · (U[g, ri] − xs[g]) as f32` over the `xs.len()` real groups of a
/// tile, in group order: the one combination every kernel path shares.
#[inline]
pub(crate) fn combine_tile(part: &[i32], xs: &[i32], d: &[f32]) -> [f32; ROW_TILE] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above).
        return unsafe { crate::kernels::avx2::combine_tile(part, xs, d) };
    }
    combine_tile_portable(part, xs, d)
}

/// [`combine_tile`] in portable code (the definition the AVX2 form follows lane by lane).
#[inline]
pub(crate) fn combine_tile_portable(part: &[i32], xs: &[i32], d: &[f32]) -> [f32; ROW_TILE] {
    let mut acc = [0.0f32; ROW_TILE];
    for (gi, &s) in xs.iter().enumerate() {
        let (p, dg) = (&part[gi * ROW_TILE..][..ROW_TILE], &d[gi * ROW_TILE..][..ROW_TILE]);
        for ri in 0..ROW_TILE {
            acc[ri] += dg[ri] * (p[ri] - s) as f32;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 combination gives the portable loop's bits: random sums and scales of both
    /// signs and magnitudes far apart (so the order of the adds shows), zero terms of either
    /// sign, and 0 to 80 groups.
    #[test]
    fn combine_tile_is_the_same_on_every_path() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for groups in [0usize, 1, 3, 40, 80] {
            for round in 0..20 {
                let part: Vec<i32> =
                    (0..groups * ROW_TILE).map(|_| (next() % 65536) as i32 - 32768).collect();
                let xs: Vec<i32> = (0..groups).map(|_| (next() % 4096) as i32 - 2048).collect();
                let d: Vec<f32> = (0..groups * ROW_TILE)
                    .map(|i| match (round + i) % 7 {
                        0 => 0.0,
                        1 => -0.0,
                        _ => (next() % 2000) as f32 * 1e-3 * if next() % 2 == 0 { 1.0 } else { -1e-5 },
                    })
                    .collect();
                let want = combine_tile_portable(&part, &xs, &d).map(f32::to_bits);
                assert_eq!(combine_tile(&part, &xs, &d).map(f32::to_bits), want, "{groups} groups");
            }
        }
    }
}
