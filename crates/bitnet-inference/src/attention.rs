//! Blocked causal attention on the CPU (flash-attention style) over a paged KV cache.
//!
//! A call serves a batch of segments, each the query rows of one sequence over that sequence's
//! cached keys and values, found through its block table. Work is split into tasks of
//! (segment, kv head, tile of query tokens). A task stacks the `n_rep` query heads that read its
//! kv head, for every token of its tile, into one block of rows, then walks the sequence's
//! cache one block ([`KEY_TILE`] keys) at a time: scores `S = Q·Kᵀ` of the rows against the
//! block's keys, the causal mask (and a sliding window's lower edge), an online softmax (running max and sum per row, in f32) and
//! `O += P·V`. Blocks past the last token of the query tile, or wholly before the window of its
//! first token, are never visited. Both products
//! run in an AVX2/FMA register-blocked microkernel where the CPU has it, and in portable loops
//! otherwise. A cache of bf16 or f16 is widened to f32 a block at a time into the task's scratch.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::backend::AttentionSegment;
use crate::kv::BLOCK_TOKENS;

/// Keys per tile: one cache block. One tile's scores for a block of rows stay in L1.
pub const KEY_TILE: usize = BLOCK_TOKENS;
/// Rows (query heads × tokens) a task aims at; a multiple of the microkernels' row blocks
/// (3 and 6).
const ROWS_TARGET: usize = 48;

/// One layer's cached keys or values, `[slots, kv_dim]`, in their stored element type.
#[derive(Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    /// bfloat16 bits.
    Bf16(&'a [u16]),
    /// IEEE half bits.
    F16(&'a [u16]),
}

impl KvSlice<'_> {
    fn len(&self) -> usize {
        match self {
            KvSlice::F32(x) => x.len(),
            KvSlice::Bf16(x) | KvSlice::F16(x) => x.len(),
        }
    }

    /// `n` rows of `hd` values starting at `start`, `stride` apart: the stored f32 rows themselves
    /// (with their stride), or widened into `buf` (stride `hd`).
    fn rows<'b>(
        &'b self,
        start: usize,
        stride: usize,
        n: usize,
        hd: usize,
        buf: &'b mut [f32],
    ) -> (&'b [f32], usize)
    where
        Self: 'b,
    {
        let widen = |src: &[u16], buf: &mut [f32], f: fn(u16) -> f32| {
            for j in 0..n {
                let s = &src[start + j * stride..][..hd];
                for (d, &x) in buf[j * hd..(j + 1) * hd].iter_mut().zip(s) {
                    *d = f(x);
                }
            }
        };
        match self {
            KvSlice::F32(x) => (&x[start..], stride),
            KvSlice::Bf16(x) => {
                widen(x, buf, |b| half::bf16::from_bits(b).to_f32());
                (&buf[..n * hd], hd)
            }
            KvSlice::F16(x) => {
                widen(x, buf, |b| half::f16::from_bits(b).to_f32());
                (&buf[..n * hd], hd)
            }
        }
    }

    fn is_f32(&self) -> bool {
        matches!(self, KvSlice::F32(_))
    }
}

/// One attention call: queries `[batch rows, n_heads, head_dim]`, and each segment's rows over
/// the layer's cache `[slots, kv_dim]` through the segment's block table.
#[derive(Clone, Copy)]
pub struct Attention<'a> {
    pub q: &'a [f32],
    pub keys: KvSlice<'a>,
    pub values: KvSlice<'a>,
    pub kv_dim: usize,
    /// The block tables of every segment, one after another.
    pub tables: &'a [u32],
    pub segments: &'a [AttentionSegment],
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The factor on the scores `q · k`.
    pub scale: f32,
    /// A sliding window: the query at position `p` sees keys `p + 1 - window ..= p` only.
    pub window: Option<usize>,
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
    /// The blocks that hold segment `s`'s context.
    fn blocks(&self, s: &AttentionSegment) -> &[u32] {
        &self.tables[s.table_start..s.table_start + (s.pos0 + s.rows).div_ceil(KEY_TILE)]
    }

    fn n_rep(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Query tokens per task.
    fn tile_tokens(&self) -> usize {
        (ROWS_TARGET / self.n_rep()).max(1)
    }

    /// Scratch floats one worker needs: packed queries, outputs, a tile's scores, running max
    /// and sum, and (for a 16-bit cache) one block of keys and values widened to f32.
    pub fn scratch_per_worker(&self) -> usize {
        let m = self.tile_tokens() * self.n_rep();
        let widened = if self.keys.is_f32() { 0 } else { 2 * KEY_TILE * self.head_dim };
        m * (2 * self.head_dim + KEY_TILE + 2) + widened
    }

    /// Multiply-adds of QKᵀ and PV (as if unmasked).
    pub fn work(&self) -> usize {
        self.segments.iter().map(|s| 2 * s.rows * self.n_heads * (s.pos0 + s.rows) * self.head_dim).sum()
    }

    /// Attention of every segment's query rows into `out` (`[batch rows, n_heads, head_dim]`).
    /// `scratch` grows to `workers` × [`Self::scratch_per_worker`] and is reused; `workers > 1`
    /// runs the tasks on the current rayon pool.
    pub fn run(&self, kernel: Kernel, workers: usize, scratch: &mut Vec<f32>, out: &mut [f32]) {
        let (hd, n_rep) = (self.head_dim, self.n_rep());
        assert!(self.n_kv_heads * n_rep == self.n_heads && self.n_kv_heads * hd <= self.kv_dim);
        assert!(kernel == Kernel::Portable || hd.is_multiple_of(16));
        let slots = self.keys.len() / self.kv_dim.max(1);
        assert!(self.values.len() >= slots * self.kv_dim);
        let row_width = self.n_heads * hd;
        for s in self.segments {
            let end = s.first_row + s.rows;
            assert!(out.len() >= end * row_width && self.q.len() >= end * row_width);
            let table_end = s.table_start + (s.pos0 + s.rows).div_ceil(KEY_TILE);
            assert!(table_end <= self.tables.len(), "a segment's block table is shorter than its context");
            assert!(
                self.blocks(s).iter().all(|&b| (b as usize + 1) * KEY_TILE <= slots),
                "a block outside the cache"
            );
        }
        let tq = self.tile_tokens();
        // Tasks of segment i are numbered from first_task[i]: its tiles (last first: the last
        // query tiles see the most keys) × kv heads.
        let tasks_of = |s: &AttentionSegment| s.rows.div_ceil(tq) * self.n_kv_heads;
        let tasks: usize = self.segments.iter().map(tasks_of).sum();
        let workers = workers.clamp(1, tasks.max(1));
        let slab = self.scratch_per_worker();
        if scratch.len() < workers * slab {
            scratch.resize(workers * slab, 0.0);
        }
        let next = AtomicUsize::new(0);
        let out = OutPtr(out.as_mut_ptr());
        let work = |slab: &mut [f32]| {
            // Tasks are taken in order, so a worker's segment cursor only moves forward.
            let (mut seg, mut seg_first) = (0, 0);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks {
                    break;
                }
                while i >= seg_first + tasks_of(&self.segments[seg]) {
                    seg_first += tasks_of(&self.segments[seg]);
                    seg += 1;
                }
                let s = &self.segments[seg];
                let local = i - seg_first;
                let tiles = s.rows.div_ceil(tq);
                let tile = tiles - 1 - local / self.n_kv_heads;
                let g = local % self.n_kv_heads;
                let t1 = ((tile + 1) * tq).min(s.rows);
                self.tile(kernel, s, g, tile * tq, t1, slab, &out);
            }
        };
        if workers == 1 {
            work(&mut scratch[..slab]);
        } else {
            scratch[..workers * slab].par_chunks_mut(slab).for_each(work);
        }
    }

    /// Query heads `g * n_rep..(g + 1) * n_rep` of tokens `t0..t1` of segment `seg`.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        kernel: Kernel,
        seg: &AttentionSegment,
        g: usize,
        t0: usize,
        t1: usize,
        slab: &mut [f32],
        out: &OutPtr,
    ) {
        let (hd, n_rep, kv_dim) = (self.head_dim, self.n_rep(), self.kv_dim);
        let m = (t1 - t0) * n_rep;
        let (qp, rest) = slab.split_at_mut(m * hd);
        let (o, rest) = rest.split_at_mut(m * hd);
        let (s, rest) = rest.split_at_mut(m * KEY_TILE);
        let (mx, rest) = rest.split_at_mut(m);
        let (l, rest) = rest.split_at_mut(m);
        let (kbuf, vbuf) = rest.split_at_mut(rest.len() / 2);
        // Row i is token t0 + i / n_rep, head g * n_rep + i % n_rep: for one token the n_rep
        // heads of a group are adjacent, so rows come n_rep × hd floats at a time.
        let row_offset =
            |i: usize| ((seg.first_row + t0 + i / n_rep) * self.n_heads + g * n_rep + i % n_rep) * hd;
        let scale = self.scale;
        for (i, dst) in qp.chunks_exact_mut(hd).enumerate() {
            let src = &self.q[row_offset(i)..row_offset(i) + hd];
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = x * scale;
            }
        }
        o.fill(0.0);
        mx.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        let end = seg.pos0 + t1; // keys the last token sees
                                 // The first key a query at position p sees: 0, or p + 1 - window in a sliding layer.
        let first_key = |p: usize| self.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let first_block = first_key(seg.pos0 + t0) / KEY_TILE;
        for (bi, &block) in self.blocks(seg)[..end.div_ceil(KEY_TILE)].iter().enumerate().skip(first_block) {
            let k0 = bi * KEY_TILE;
            let kn = KEY_TILE.min(end - k0);
            let start = block as usize * KEY_TILE * kv_dim + g * hd;
            let (keys, ks) = self.keys.rows(start, kv_dim, kn, hd, kbuf);
            kernel.qk(qp, m, hd, keys, ks, kn, s);
            for i in 0..m {
                let p = seg.pos0 + t0 + i / n_rep;
                let valid = kn.min((p + 1).saturating_sub(k0));
                let lo = first_key(p).saturating_sub(k0).min(valid);
                let row = &mut s[i * KEY_TILE..i * KEY_TILE + kn];
                row[valid..].fill(0.0); // causal mask: these keys get no weight
                row[..lo].fill(0.0); // before the window: no weight either
                if lo == valid {
                    continue;
                }
                let tile_max = row[lo..valid].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let new_max = mx[i].max(tile_max);
                let alpha = (mx[i] - new_max).exp();
                let sum = kernel.exp_sub_sum(&mut row[lo..valid], new_max);
                if alpha != 1.0 {
                    for x in &mut o[i * hd..(i + 1) * hd] {
                        *x *= alpha;
                    }
                }
                l[i] = l[i] * alpha + sum;
                mx[i] = new_max;
            }
            let (values, vs) = self.values.rows(start, kv_dim, kn, hd, vbuf);
            kernel.pv(s, m, kn, values, vs, o, hd);
        }
        for (i, oi) in o.chunks_exact(hd).enumerate() {
            let inv = 1.0 / l[i];
            // SAFETY: `run` checked out.len() covers every segment's rows; row_offset(i) + hd is
            // inside it, and no other task writes these rows (each (segment, token, head)
            // belongs to exactly one (segment, kv head, query tile) task).
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

    /// One sequence's rows and its keys and values laid out by position, `[ctx, kv_dim]`.
    struct Case {
        q: Vec<f32>,
        keys: Vec<f32>,
        values: Vec<f32>,
        rows: usize,
        pos0: usize,
    }

    /// Per (token, head): scores, causal mask (and window), softmax in f64, weighted sum of
    /// values.
    fn reference(c: &Case, n_heads: usize, n_kv: usize, hd: usize, window: Option<usize>) -> Vec<f32> {
        let (n_rep, kv_dim) = (n_heads / n_kv, n_kv * hd);
        let mut out = vec![0.0; c.rows * n_heads * hd];
        for t in 0..c.rows {
            for h in 0..n_heads {
                let g = h / n_rep;
                let q = &c.q[(t * n_heads + h) * hd..][..hd];
                let visible = c.pos0 + t + 1;
                let first = window.map_or(0, |w| visible.saturating_sub(w));
                let scores: Vec<f64> = (first..visible)
                    .map(|j| {
                        let k = &c.keys[j * kv_dim + g * hd..][..hd];
                        q.iter().zip(k).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let o: f64 = (first..visible)
                        .map(|j| e[j - first] * c.values[j * kv_dim + g * hd + d] as f64)
                        .sum();
                    out[(t * n_heads + h) * hd + d] = (o / sum) as f32;
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

    /// The cases' keys and values scattered into a cache of blocks in a shuffled order, with the
    /// block table of each case.
    fn paged(cases: &[Case], kv_dim: usize) -> (Vec<f32>, Vec<f32>, Vec<Vec<u32>>) {
        let blocks_of = |c: &Case| (c.pos0 + c.rows).div_ceil(KEY_TILE);
        let total: usize = cases.iter().map(blocks_of).sum::<usize>() + 2;
        // A fixed permutation of the block ids (odd multiplier modulo total, made coprime).
        let mut step = 7;
        while gcd(step, total) != 1 {
            step += 2;
        }
        let mut ids = (0..total).map(|i| ((i * step + 3) % total) as u32);
        let (mut keys, mut values) = (
            pseudo_random(total * KEY_TILE * kv_dim, 99, 9.0),
            pseudo_random(total * KEY_TILE * kv_dim, 98, 9.0),
        );
        let mut tables = Vec::new();
        for c in cases {
            let table: Vec<u32> = (&mut ids).take(blocks_of(c)).collect();
            for p in 0..c.pos0 + c.rows {
                let slot = table[p / KEY_TILE] as usize * KEY_TILE + p % KEY_TILE;
                keys[slot * kv_dim..(slot + 1) * kv_dim]
                    .copy_from_slice(&c.keys[p * kv_dim..(p + 1) * kv_dim]);
                values[slot * kv_dim..(slot + 1) * kv_dim]
                    .copy_from_slice(&c.values[p * kv_dim..(p + 1) * kv_dim]);
            }
            tables.push(table);
        }
        (keys, values, tables)
    }

    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }

    fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        if Kernel::detect(64) != Kernel::Portable {
            kernels.push(Kernel::detect(64));
        }
        kernels
    }

    /// Whole-context and sliding-window attention (windows of one key, shorter than a block,
    /// across blocks, longer than every context).
    #[test]
    fn paged_batched_attention_matches_reference_on_ragged_shapes() {
        let mut scratch = Vec::new();
        for window in [None, Some(1), Some(7), Some(40), Some(1000)] {
            for &n_rep in &[1, 4] {
                for &hd in &[32, 64, 128] {
                    let n_kv = 2;
                    let (n_heads, kv_dim) = (n_kv * n_rep, n_kv * hd);
                    // Segments of several sequences in one call: prefill chunks, decode steps, and
                    // contexts ending inside, at and past block boundaries.
                    let shapes = [(1, 0), (3, 5), (17, 0), (70, 5), (1, 31), (1, 64), (33, 31)];
                    let cases: Vec<Case> = shapes
                        .iter()
                        .enumerate()
                        .map(|(i, &(rows, pos0))| {
                            let seed = (i * 1000 + n_rep * 10 + hd) as u64;
                            let ctx = pos0 + rows;
                            Case {
                                // Amplitude 2 gives peaked softmaxes.
                                q: pseudo_random(rows * n_heads * hd, seed, 2.0),
                                keys: pseudo_random(ctx * kv_dim, seed + 1, 2.0),
                                values: pseudo_random(ctx * kv_dim, seed + 2, 1.0),
                                rows,
                                pos0,
                            }
                        })
                        .collect();
                    let (keys, values, per_case) = paged(&cases, kv_dim);
                    let tables: Vec<u32> = per_case.concat();
                    let mut q = Vec::new();
                    let mut segments = Vec::new();
                    let mut want = Vec::new();
                    let mut table_start = 0;
                    for (c, table) in cases.iter().zip(&per_case) {
                        segments.push(AttentionSegment {
                            first_row: q.len() / (n_heads * hd),
                            rows: c.rows,
                            pos0: c.pos0,
                            table_start,
                        });
                        table_start += table.len();
                        q.extend_from_slice(&c.q);
                        want.extend(reference(c, n_heads, n_kv, hd, window));
                    }
                    let a = Attention {
                        q: &q,
                        keys: KvSlice::F32(&keys),
                        values: KvSlice::F32(&values),
                        kv_dim,
                        tables: &tables,
                        segments: &segments,
                        n_heads,
                        n_kv_heads: n_kv,
                        head_dim: hd,
                        scale: (hd as f32).powf(-0.5),
                        window,
                    };
                    for &kernel in &kernels() {
                        for workers in [1, 3] {
                            let mut got = vec![f32::NAN; want.len()];
                            a.run(kernel, workers, &mut scratch, &mut got);
                            let norm = want.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
                            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                                assert!(
                                (g - w).abs() <= 1e-5 * norm.max(w.abs()),
                                "{kernel:?} window {window:?} n_rep {n_rep} hd {hd} workers {workers} [{i}]: {g} vs {w}"
                            );
                            }
                            // Each segment alone gives bit-identical rows to the batch, and decoding
                            // token t (one row at pos0 + t) gives the prefill's row: batching and
                            // KV-cache decoding change nothing.
                            for (si, s) in segments.iter().enumerate() {
                                let width = n_heads * hd;
                                let batch_rows = &got[s.first_row * width..(s.first_row + s.rows) * width];
                                let alone = AttentionSegment { first_row: 0, ..*s };
                                let one = Attention { q: &q[s.first_row * width..], segments: &[alone], ..a };
                                let mut own = vec![0.0; s.rows * width];
                                one.run(kernel, 1, &mut scratch, &mut own);
                                assert_eq!(own, batch_rows, "{kernel:?} segment {si}");
                                for t in [0, s.rows / 2, s.rows - 1] {
                                    let step =
                                        AttentionSegment { first_row: 0, rows: 1, pos0: s.pos0 + t, ..*s };
                                    let q_t = &q[(s.first_row + t) * width..];
                                    let mut row = vec![0.0; width];
                                    Attention { q: q_t, segments: &[step], ..a }.run(
                                        kernel,
                                        1,
                                        &mut scratch,
                                        &mut row,
                                    );
                                    assert_eq!(
                                        row,
                                        batch_rows[t * width..(t + 1) * width],
                                        "{kernel:?} seg {si} t {t}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_16_bit_cache_equals_the_f32_cache_of_its_rounded_values() {
        use half::{bf16, f16};
        let (n_heads, n_kv, hd) = (4, 2, 64);
        let kv_dim = n_kv * hd;
        let (rows, pos0): (usize, usize) = (40, 9);
        let ctx = pos0 + rows;
        let table: Vec<u32> = (0..ctx.div_ceil(KEY_TILE) as u32).rev().collect();
        let slots = table.len() * KEY_TILE;
        let q = pseudo_random(rows * n_heads * hd, 1, 2.0);
        let (k, v) = (pseudo_random(slots * kv_dim, 2, 2.0), pseudo_random(slots * kv_dim, 3, 1.0));
        let seg = [AttentionSegment { first_row: 0, rows, pos0, table_start: 0 }];
        let mut scratch = Vec::new();
        type Round = (fn(f32) -> u16, fn(u16) -> f32);
        let bf: Round = (|x| bf16::from_f32(x).to_bits(), |b| bf16::from_bits(b).to_f32());
        let hf: Round = (|x| f16::from_f32(x).to_bits(), |b| f16::from_bits(b).to_f32());
        for (name, (to_bits, from_bits)) in [("bf16", bf), ("f16", hf)] {
            let (kb, vb): (Vec<u16>, Vec<u16>) =
                (k.iter().map(|&x| to_bits(x)).collect(), v.iter().map(|&x| to_bits(x)).collect());
            let (kr, vr): (Vec<f32>, Vec<f32>) =
                (kb.iter().map(|&b| from_bits(b)).collect(), vb.iter().map(|&b| from_bits(b)).collect());
            let wrap = |x: &'static [u16]| if name == "bf16" { KvSlice::Bf16(x) } else { KvSlice::F16(x) };
            let (kb, vb): (&'static [u16], &'static [u16]) = (kb.leak(), vb.leak());
            for kernel in kernels() {
                let base = Attention {
                    q: &q,
                    keys: KvSlice::F32(&kr),
                    values: KvSlice::F32(&vr),
                    kv_dim,
                    tables: &table,
                    segments: &seg,
                    n_heads,
                    n_kv_heads: n_kv,
                    head_dim: hd,
                    scale: (hd as f32).powf(-0.5),
                    window: None,
                };
                let (mut want, mut got) = (vec![0.0; rows * n_heads * hd], vec![1.0; rows * n_heads * hd]);
                base.run(kernel, 1, &mut scratch, &mut want);
                Attention { keys: wrap(kb), values: wrap(vb), ..base }.run(kernel, 2, &mut scratch, &mut got);
                assert_eq!(got, want, "{name} {kernel:?}");
            }
        }
    }
}
