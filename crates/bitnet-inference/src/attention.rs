//! Blocked causal attention on the CPU (flash-attention style).
//!
//! Work is split into tasks of (kv head, tile of query tokens). A task stacks the `n_rep` query
//! heads that read its kv head, for every token of its tile, into one block of rows, then walks
//! the keys in tiles of [`KEY_TILE`]: scores `S = Q·Kᵀ` of the block against the key tile, the
//! causal mask, an online softmax (running max and sum per row, in f32) and `O += P·V`. Key
//! tiles past the last token of the query tile are never visited. Both products run in an
//! AVX2/FMA register-blocked microkernel where the CPU has it, and in portable loops otherwise.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

/// Keys per tile: one tile's scores for a block of rows stay in L1.
pub const KEY_TILE: usize = 64;
/// Rows (query heads × tokens) a task aims at; a multiple of the microkernels' row blocks
/// (3 and 6).
const ROWS_TARGET: usize = 48;

/// One attention call: queries `[rows, n_heads, head_dim]`, the layer's cache
/// `[positions, kv_dim]` holding positions `0..pos0 + rows`.
#[derive(Clone, Copy)]
pub struct Attention<'a> {
    pub q: &'a [f32],
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub kv_dim: usize,
    pub rows: usize,
    pub pos0: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Which microkernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU runs for heads of `head_dim`.
    pub fn detect(head_dim: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if head_dim.is_multiple_of(16) && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        {
            return Kernel::Avx2;
        }
        let _ = head_dim;
        Kernel::Portable
    }

    #[allow(clippy::too_many_arguments)]
    fn qk(self, q: &[f32], m: usize, hd: usize, k: &[f32], ks: usize, kn: usize, s: &mut [f32]) {
        match self {
            Kernel::Portable => portable::qk(q, m, hd, k, ks, kn, s, KEY_TILE),
            // SAFETY: Avx2 is only chosen where the CPU has AVX2 and FMA, and for hd % 16 == 0.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::qk(q, m, hd, k, ks, kn, s, KEY_TILE) },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn pv(self, p: &[f32], m: usize, kn: usize, v: &[f32], vs: usize, o: &mut [f32], hd: usize) {
        match self {
            Kernel::Portable => portable::pv(p, KEY_TILE, m, kn, v, vs, o, hd),
            // SAFETY: as in `qk`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::pv(p, KEY_TILE, m, kn, v, vs, o, hd) },
        }
    }

    /// `x = exp(x - max)` in place; returns the sum.
    fn exp_sub_sum(self, x: &mut [f32], max: f32) -> f32 {
        match self {
            Kernel::Portable => portable::exp_sub_sum(x, max),
            // SAFETY: as in `qk`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::exp_sub_sum(x, max) },
        }
    }
}

impl Attention<'_> {
    fn n_rep(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Query tokens per task.
    fn tile_tokens(&self) -> usize {
        (ROWS_TARGET / self.n_rep()).max(1)
    }

    /// Scratch floats one worker needs.
    pub fn scratch_per_worker(&self) -> usize {
        let m = self.tile_tokens() * self.n_rep();
        m * (2 * self.head_dim + KEY_TILE + 2)
    }

    /// Multiply-adds of QKᵀ and PV (as if unmasked: what the old per-head loop counted).
    pub fn work(&self) -> usize {
        2 * self.rows * self.n_heads * (self.pos0 + self.rows) * self.head_dim
    }

    /// Attention of every query row into `out` (`[rows, n_heads, head_dim]`). `scratch` grows
    /// to `workers` × [`Self::scratch_per_worker`] and is reused; `workers > 1` runs the tasks
    /// on the current rayon pool.
    pub fn run(&self, kernel: Kernel, workers: usize, scratch: &mut Vec<f32>, out: &mut [f32]) {
        let (hd, n_rep) = (self.head_dim, self.n_rep());
        assert!(self.n_kv_heads * n_rep == self.n_heads && self.n_kv_heads * hd <= self.kv_dim);
        assert!(out.len() >= self.rows * self.n_heads * hd && self.q.len() >= self.rows * self.n_heads * hd);
        let ctx = self.pos0 + self.rows;
        assert!(self.keys.len() >= ctx * self.kv_dim && self.values.len() >= ctx * self.kv_dim);
        assert!(kernel == Kernel::Portable || hd.is_multiple_of(16));
        let tq = self.tile_tokens();
        let tiles = self.rows.div_ceil(tq);
        let tasks = tiles * self.n_kv_heads;
        let workers = workers.clamp(1, tasks.max(1));
        let slab = self.scratch_per_worker();
        if scratch.len() < workers * slab {
            scratch.resize(workers * slab, 0.0);
        }
        let next = AtomicUsize::new(0);
        let out = OutPtr(out.as_mut_ptr());
        // Tasks are handed out heaviest first (the last query tiles see the most keys).
        let work = |slab: &mut [f32]| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= tasks {
                break;
            }
            let tile = tiles - 1 - i / self.n_kv_heads;
            let g = i % self.n_kv_heads;
            let t1 = ((tile + 1) * tq).min(self.rows);
            self.tile(kernel, g, tile * tq, t1, slab, &out);
        };
        if workers == 1 {
            work(&mut scratch[..slab]);
        } else {
            scratch[..workers * slab].par_chunks_mut(slab).for_each(work);
        }
    }

    /// Query heads `g * n_rep..(g + 1) * n_rep` of tokens `t0..t1`.
    fn tile(&self, kernel: Kernel, g: usize, t0: usize, t1: usize, slab: &mut [f32], out: &OutPtr) {
        let (hd, n_rep, kv_dim) = (self.head_dim, self.n_rep(), self.kv_dim);
        let m = (t1 - t0) * n_rep;
        let (qp, rest) = slab.split_at_mut(m * hd);
        let (o, rest) = rest.split_at_mut(m * hd);
        let (s, rest) = rest.split_at_mut(m * KEY_TILE);
        let (mx, rest) = rest.split_at_mut(m);
        let l = &mut rest[..m];
        // Row i is token t0 + i / n_rep, head g * n_rep + i % n_rep: for one token the n_rep
        // heads of a group are adjacent, so rows come n_rep × hd floats at a time.
        let row_offset = |i: usize| ((t0 + i / n_rep) * self.n_heads + g * n_rep + i % n_rep) * hd;
        let scale = (hd as f32).powf(-0.5);
        for (i, dst) in qp.chunks_exact_mut(hd).enumerate() {
            let src = &self.q[row_offset(i)..row_offset(i) + hd];
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = x * scale;
            }
        }
        o.fill(0.0);
        mx.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        let (keys, values) = (&self.keys[g * hd..], &self.values[g * hd..]);
        let end = self.pos0 + t1; // keys the last token sees
        for k0 in (0..end).step_by(KEY_TILE) {
            let kn = KEY_TILE.min(end - k0);
            kernel.qk(qp, m, hd, &keys[k0 * kv_dim..], kv_dim, kn, s);
            for i in 0..m {
                let visible = self.pos0 + t0 + i / n_rep + 1;
                let valid = kn.min(visible.saturating_sub(k0));
                let row = &mut s[i * KEY_TILE..i * KEY_TILE + kn];
                row[valid..].fill(0.0); // causal mask: these keys get no weight
                if valid == 0 {
                    continue;
                }
                let tile_max = row[..valid].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let new_max = mx[i].max(tile_max);
                let alpha = (mx[i] - new_max).exp();
                let sum = kernel.exp_sub_sum(&mut row[..valid], new_max);
                if alpha != 1.0 {
                    for x in &mut o[i * hd..(i + 1) * hd] {
                        *x *= alpha;
                    }
                }
                l[i] = l[i] * alpha + sum;
                mx[i] = new_max;
            }
            kernel.pv(s, m, kn, &values[k0 * kv_dim..], kv_dim, o, hd);
        }
        for (i, oi) in o.chunks_exact(hd).enumerate() {
            let inv = 1.0 / l[i];
            // SAFETY: `run` checked out.len() >= rows * n_heads * hd; row_offset(i) + hd is
            // inside it, and no other task writes these rows (each (token, head) belongs to
            // exactly one (kv head, query tile) task).
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(row_offset(i)), hd) };
            for (d, &x) in dst.iter_mut().zip(oi) {
                *d = x * inv;
            }
        }
    }
}

/// The output, written by tasks at disjoint rows.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint rows through it (see `Attention::tile`).
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

mod portable {
    /// `s[i * ss + j] = q_i · k_j` for rows `i < m` (stride hd) and keys `j < kn` (stride ks).
    #[allow(clippy::too_many_arguments)]
    pub fn qk(q: &[f32], m: usize, hd: usize, k: &[f32], ks: usize, kn: usize, s: &mut [f32], ss: usize) {
        for i in 0..m {
            let qi = &q[i * hd..(i + 1) * hd];
            for j in 0..kn {
                s[i * ss + j] = bitnet_core::dense::dot_f32(qi, &k[j * ks..j * ks + hd]);
            }
        }
    }

    /// `o_i += Σ_j p[i * ps + j] · v_j`.
    #[allow(clippy::too_many_arguments)]
    pub fn pv(p: &[f32], ps: usize, m: usize, kn: usize, v: &[f32], vs: usize, o: &mut [f32], hd: usize) {
        for i in 0..m {
            let oi = &mut o[i * hd..(i + 1) * hd];
            for j in 0..kn {
                let pij = p[i * ps + j];
                for (a, &b) in oi.iter_mut().zip(&v[j * vs..j * vs + hd]) {
                    *a += pij * b;
                }
            }
        }
    }

    pub fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
        let mut sum = 0.0;
        for v in x {
            *v = (*v - max).exp();
            sum += *v;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// As `portable::qk`, in blocks of 3 rows × 4 keys: twelve 8-lane accumulators along hd,
    /// reduced four keys at a time into one 4-lane store.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn qk(
        q: &[f32],
        m: usize,
        hd: usize,
        k: &[f32],
        ks: usize,
        kn: usize,
        s: &mut [f32],
        ss: usize,
    ) {
        if m == 0 || kn == 0 {
            return;
        }
        assert!(hd.is_multiple_of(8) && q.len() >= m * hd && k.len() >= (kn - 1) * ks + hd);
        assert!(s.len() >= (m - 1) * ss + kn);
        let (q, k, s) = (q.as_ptr(), k.as_ptr(), s.as_mut_ptr());
        let mut i = 0;
        // SAFETY (all blocks): rows i..i+R < m and keys < kn, inside the slices checked above.
        while i + 3 <= m {
            unsafe { qk_rows::<3>(q.add(i * hd), hd, k, ks, kn, s.add(i * ss), ss) };
            i += 3;
        }
        match m - i {
            2 => unsafe { qk_rows::<2>(q.add(i * hd), hd, k, ks, kn, s.add(i * ss), ss) },
            1 => unsafe { qk_rows::<1>(q.add(i * hd), hd, k, ks, kn, s.add(i * ss), ss) },
            _ => {}
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn qk_rows<const R: usize>(
        q: *const f32,
        hd: usize,
        k: *const f32,
        ks: usize,
        kn: usize,
        s: *mut f32,
        ss: usize,
    ) {
        let mut j = 0;
        while j + 4 <= kn {
            unsafe { qk_block::<R, 4>(q, hd, k.add(j * ks), ks, s.add(j), ss) };
            j += 4;
        }
        while j < kn {
            unsafe { qk_block::<R, 1>(q, hd, k.add(j * ks), ks, s.add(j), ss) };
            j += 1;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn qk_block<const R: usize, const C: usize>(
        q: *const f32,
        hd: usize,
        k: *const f32,
        ks: usize,
        s: *mut f32,
        ss: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut d = 0;
        while d < hd {
            let mut kv = [_mm256_setzero_ps(); C];
            for (c, kv) in kv.iter_mut().enumerate() {
                *kv = unsafe { _mm256_loadu_ps(k.add(c * ks + d)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let qv = unsafe { _mm256_loadu_ps(q.add(r * hd + d)) };
                for (a, &kv) in acc.iter_mut().zip(&kv) {
                    *a = _mm256_fmadd_ps(qv, kv, *a);
                }
            }
            d += 8;
        }
        for (r, acc) in acc.iter().enumerate() {
            if C == 4 {
                let t0 = _mm256_hadd_ps(acc[0], acc[1]);
                let t1 = _mm256_hadd_ps(acc[2], acc[3]);
                let t = _mm256_hadd_ps(t0, t1);
                let sum = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
                unsafe { _mm_storeu_ps(s.add(r * ss), sum) };
            } else {
                for (c, &a) in acc.iter().enumerate() {
                    unsafe { *s.add(r * ss + c) = hsum(a) };
                }
            }
        }
    }

    /// The sum of 8 lanes, added in the order of `qk_block`'s four-key reduction, so that a
    /// score does not depend on whether its key fell in a block of four or in the tail (a
    /// decoded token then sees bit-identical scores to the same token in a prefill).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(a: __m256) -> f32 {
        let t = _mm256_hadd_ps(a, a);
        let t = _mm256_hadd_ps(t, t);
        _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)))
    }

    /// As `portable::pv`, in blocks of 6 rows × 16 dims: twelve accumulators, per key two
    /// loads of v and six broadcasts of p.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pv(
        p: &[f32],
        ps: usize,
        m: usize,
        kn: usize,
        v: &[f32],
        vs: usize,
        o: &mut [f32],
        hd: usize,
    ) {
        if m == 0 || kn == 0 {
            return;
        }
        assert!(hd.is_multiple_of(16) && p.len() >= (m - 1) * ps + kn && v.len() >= (kn - 1) * vs + hd);
        assert!(o.len() >= m * hd);
        let (p, v, o) = (p.as_ptr(), v.as_ptr(), o.as_mut_ptr());
        let mut i = 0;
        // SAFETY (all blocks): rows i..i+R < m, keys < kn, dims < hd: inside the checked slices.
        while i + 6 <= m {
            unsafe { pv_rows::<6>(p.add(i * ps), ps, kn, v, vs, o.add(i * hd), hd) };
            i += 6;
        }
        unsafe {
            match m - i {
                5 => pv_rows::<5>(p.add(i * ps), ps, kn, v, vs, o.add(i * hd), hd),
                4 => pv_rows::<4>(p.add(i * ps), ps, kn, v, vs, o.add(i * hd), hd),
                3 => pv_rows::<3>(p.add(i * ps), ps, kn, v, vs, o.add(i * hd), hd),
                2 => pv_rows::<2>(p.add(i * ps), ps, kn, v, vs, o.add(i * hd), hd),
                1 => pv_rows::<1>(p.add(i * ps), ps, kn, v, vs, o.add(i * hd), hd),
                _ => {}
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn pv_rows<const R: usize>(
        p: *const f32,
        ps: usize,
        kn: usize,
        v: *const f32,
        vs: usize,
        o: *mut f32,
        hd: usize,
    ) {
        let mut d = 0;
        while d < hd {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for (r, acc) in acc.iter_mut().enumerate() {
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = unsafe { _mm256_loadu_ps(o.add(r * hd + d + 8 * c)) };
                }
            }
            for j in 0..kn {
                let v0 = unsafe { _mm256_loadu_ps(v.add(j * vs + d)) };
                let v1 = unsafe { _mm256_loadu_ps(v.add(j * vs + d + 8)) };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pb = unsafe { _mm256_broadcast_ss(&*p.add(r * ps + j)) };
                    acc[0] = _mm256_fmadd_ps(pb, v0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(pb, v1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (c, &a) in acc.iter().enumerate() {
                    unsafe { _mm256_storeu_ps(o.add(r * hd + d + 8 * c), a) };
                }
            }
            d += 16;
        }
    }

    /// `x = exp(x - max)`, returning the sum: Cephes' single-precision exp (range reduction
    /// by ln 2 in two parts, degree-5 polynomial, exponent by integer shift), ~1 ulp.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: c has 8 floats.
            let e = exp(_mm256_sub_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, m));
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), e) };
            acc = _mm256_add_ps(acc, e);
        }
        let mut sum = hsum(acc);
        for v in chunks.into_remainder() {
            *v = (*v - max).exp();
            sum += *v;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.376_26)), _mm256_set1_ps(-87.336_55));
        let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
        }
        y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0)));
        let n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)));
        _mm256_mul_ps(y, _mm256_castsi256_ps(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per (token, head): scores, causal mask, softmax in f64, weighted sum of values.
    fn reference(a: &Attention) -> Vec<f32> {
        let (hd, n_rep) = (a.head_dim, a.n_heads / a.n_kv_heads);
        let mut out = vec![0.0; a.rows * a.n_heads * hd];
        for t in 0..a.rows {
            for h in 0..a.n_heads {
                let g = h / n_rep;
                let q = &a.q[(t * a.n_heads + h) * hd..][..hd];
                let visible = a.pos0 + t + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let k = &a.keys[j * a.kv_dim + g * hd..][..hd];
                        q.iter().zip(k).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let o: f64 =
                        (0..visible).map(|j| e[j] * a.values[j * a.kv_dim + g * hd + d] as f64).sum();
                    out[(t * a.n_heads + h) * hd + d] = (o / sum) as f32;
                }
            }
        }
        out
    }

    fn pseudo_random(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    #[test]
    fn blocked_attention_matches_reference_on_ragged_shapes() {
        let mut kernels = vec![Kernel::Portable];
        if Kernel::detect(64) != Kernel::Portable {
            kernels.push(Kernel::detect(64));
        }
        let mut scratch = Vec::new();
        for &rows in &[1, 3, 17, 70] {
            for &pos0 in &[0, 5] {
                for &n_rep in &[1, 4] {
                    for &hd in &[32, 64, 128] {
                        let n_kv = 2;
                        let n_heads = n_kv * n_rep;
                        let kv_dim = n_kv * hd;
                        let ctx = pos0 + rows;
                        let seed = (rows * 1000 + pos0 * 100 + n_rep * 10 + hd) as u64;
                        // Amplitude 2 gives peaked softmaxes (scores up to ~hd/√hd·4).
                        let q = pseudo_random(rows * n_heads * hd, seed, 2.0);
                        let keys = pseudo_random((ctx + 3) * kv_dim, seed + 1, 2.0);
                        let values = pseudo_random((ctx + 3) * kv_dim, seed + 2, 1.0);
                        let a = Attention {
                            q: &q,
                            keys: &keys,
                            values: &values,
                            kv_dim,
                            rows,
                            pos0,
                            n_heads,
                            n_kv_heads: n_kv,
                            head_dim: hd,
                        };
                        let want = reference(&a);
                        for &kernel in &kernels {
                            for workers in [1, 3] {
                                let mut got = vec![f32::NAN; want.len()];
                                a.run(kernel, workers, &mut scratch, &mut got);
                                let norm = want.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
                                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                                    assert!(
                                        (g - w).abs() <= 1e-5 * norm.max(w.abs()),
                                        "{kernel:?} rows {rows} pos0 {pos0} n_rep {n_rep} hd {hd} \
                                         workers {workers} [{i}]: {g} vs {w}"
                                    );
                                }
                            }
                            // Decoding token t (rows 1 at pos0 + t) gives bit-identical rows to
                            // the prefill: KV-cache decode equals a full recompute.
                            for t in [0, rows / 2, rows - 1] {
                                let step =
                                    Attention { q: &q[t * n_heads * hd..], rows: 1, pos0: pos0 + t, ..a };
                                let mut full = vec![0.0; want.len()];
                                let mut one = vec![0.0; n_heads * hd];
                                a.run(kernel, 1, &mut scratch, &mut full);
                                step.run(kernel, 1, &mut scratch, &mut one);
                                assert_eq!(one, full[t * n_heads * hd..(t + 1) * n_heads * hd], "{kernel:?}");
                            }
                        }
                    }
                }
            }
        }
    }
}
