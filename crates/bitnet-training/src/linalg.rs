//! Dense matrix products through the `gemm` crate, and the row-parallel helpers.
//!
//! All matrices are row-major. A transposed operand is read through its strides, never copied.

use bitnet_quant::int16::PackedPairs;
use bitnet_quant::QuantizedActivations;
use gemm::Parallelism;
use rayon::prelude::*;

use crate::real::Real;

/// A matrix operand: its data, and whether the product reads it transposed.
#[derive(Clone, Copy)]
pub struct Operand<'a, T> {
    pub data: &'a [T],
    /// Rows and columns of the matrix as stored.
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a, T> Operand<'a, T> {
    /// The matrix as stored, `[rows, cols]`.
    pub fn n(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, transposed: false }
    }
    /// The transpose of the stored `[rows, cols]` matrix.
    pub fn t(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, transposed: true }
    }
    fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
    /// (row stride, column stride) of the operand as the product reads it.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.cols as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// Products below this many multiply-adds run on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `c = a · b` (or `c += a · b` when `accumulate`), `c` row-major `[m, n]`.
/// `parallel` lets the product use the current rayon pool; pass `false` from inside a
/// parallel loop.
pub fn matmul<T: Real>(c: &mut [T], a: Operand<'_, T>, b: Operand<'_, T>, accumulate: bool, parallel: bool) {
    let _t = crate::profile::section("matmul (f32 GEMM)");
    let (m, k) = a.shape();
    let (kb, n) = b.shape();
    assert_eq!(k, kb, "inner dimensions of a matrix product differ");
    assert!(a.data.len() >= a.rows * a.cols && b.data.len() >= b.rows * b.cols);
    assert!(c.len() >= m * n, "product output too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(T::ZERO);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 && m * n * k >= PARALLEL_MIN_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    // SAFETY: the asserts above keep every index the strides reach inside the slices;
    // `c` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A strided view for the attention products: `[rows, cols]` with row stride `rs`.
pub struct Strided<T> {
    pub ptr: *const T,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub transposed: bool,
}

/// `c = a · b` (or `+=`) over raw strided views, single-threaded. `c` has row stride `c_rs`.
///
/// # Safety
/// Every element the views describe must be readable, `c`'s must be writable, and no other
/// thread may write them during the call.
pub unsafe fn matmul_strided<T: Real>(
    c: *mut T,
    c_rs: usize,
    a: &Strided<T>,
    b: &Strided<T>,
    accumulate: bool,
) {
    let (m, k, a_rs, a_cs) =
        if a.transposed { (a.cols, a.rows, 1, a.rs as isize) } else { (a.rows, a.cols, a.rs as isize, 1) };
    let (kb, n, b_rs, b_cs) =
        if b.transposed { (b.cols, b.rows, 1, b.rs as isize) } else { (b.rows, b.cols, b.rs as isize, 1) };
    assert_eq!(k, kb, "inner dimensions of a matrix product differ");
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        accumulate,
        a.ptr,
        a_cs,
        a_rs,
        b.ptr,
        b_cs,
        b_rs,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// Rows handled together by the parallel helpers. A fixed size (not one per thread) keeps every
/// reduction in the same order whatever the thread count.
pub const ROW_CHUNK: usize = 16;

/// Values per task of the parallel fills, copies and adds (64 KB of f32).
const COPY_CHUNK: usize = 1 << 14;

/// `x += y`, elementwise (the residual add, a group's gradient split), in parallel.
pub fn add_into<T: Real>(x: &mut [T], y: &[T]) {
    let _t = crate::profile::section("add_into");
    x.par_chunks_mut(COPY_CHUNK).zip(y.par_chunks(COPY_CHUNK)).for_each(|(xc, yc)| {
        for (a, &b) in xc.iter_mut().zip(yc) {
            *a += b;
        }
    });
}

/// Recycled buffers for the activations and gradients of a step.
///
/// A step allocates and frees the same few hundred MB every time; fresh large allocations come
/// from `mmap` and fault in page by page (about a seventh of a step's time when profiled). The
/// pool hands the freed buffers back instead. Every float buffer is handed out zeroed or fully
/// overwritten, so results do not depend on what it held; the integer buffers of the ternary
/// forward are always fully overwritten by their user.
pub struct Scratch<T> {
    floats: Pool<Vec<T>>,
    /// The i32 sums of the integer BitLinear forward.
    sums: Pool<Vec<i32>>,
    /// The int8 codes of a BitLinear input on their way into an activation buffer.
    int8: Pool<Vec<i8>>,
    /// Activation buffers of the integer kernels (a few hundred KB to a few MB each).
    activations: Pool<QuantizedActivations>,
    /// 16-bit gradients and packed int8 operands of the mixed-precision backward.
    int16: Pool<Vec<i16>>,
    pairs: Pool<PackedPairs>,
}

/// Buffers of one kind waiting to be reused.
struct Pool<V>(std::sync::Mutex<Vec<V>>);

impl<V> Default for Pool<V> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }
}

impl<V> Pool<V> {
    /// The pooled buffer of smallest `size` among those `size` accepts (`None`: does not fit).
    fn take(&self, size: impl Fn(&V) -> Option<usize>) -> Option<V> {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let best = pool
            .iter()
            .enumerate()
            .filter_map(|(i, v)| size(v).map(|s| (i, s)))
            .min_by_key(|&(_, s)| s)
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i))
    }

    fn give(&self, v: V) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(v);
    }
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Self {
            floats: Pool::default(),
            sums: Pool::default(),
            int8: Pool::default(),
            activations: Pool::default(),
            int16: Pool::default(),
            pairs: Pool::default(),
        }
    }
}

/// A clone starts with empty pools.
impl<T> Clone for Scratch<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> std::fmt::Debug for Scratch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scratch")
    }
}

/// A pooled vector of length `n` whose contents are unspecified (the caller overwrites them).
fn reused_vec<V: Copy + Default>(pool: &Pool<Vec<V>>, n: usize) -> Vec<V> {
    let mut v = pool.take(|v| (v.capacity() >= n).then_some(v.capacity())).unwrap_or_default();
    if v.len() >= n {
        v.truncate(n);
    } else {
        v.resize(n, V::default());
    }
    v
}

impl<T: Real> Scratch<T> {
    /// An empty buffer with room for at least `n` values (the smallest pooled one that fits).
    pub fn empty(&self, n: usize) -> Vec<T> {
        match self.floats.take(|v| (v.capacity() >= n).then_some(v.capacity())) {
            Some(mut v) => {
                v.clear();
                v
            }
            None => Vec::with_capacity(n),
        }
    }

    /// `n` values with unspecified contents, for a caller that writes every one of them before
    /// reading any (skips the zeroing pass of [`Scratch::zeros`]).
    pub fn dirty(&self, n: usize) -> Vec<T> {
        reused_vec(&self.floats, n)
    }

    /// `n` zeros.
    pub fn zeros(&self, n: usize) -> Vec<T> {
        let _t = crate::profile::section("scratch zeros and copies");
        let mut v = self.dirty(n);
        // Buffers run to tens of MB: one thread's memset would be a serial stretch of the step.
        v.par_chunks_mut(COPY_CHUNK).for_each(|c| c.fill(T::ZERO));
        v
    }

    /// A copy of `x`.
    pub fn copy_of(&self, x: &[T]) -> Vec<T> {
        let _t = crate::profile::section("scratch zeros and copies");
        let mut v = self.dirty(x.len());
        v.par_chunks_mut(COPY_CHUNK).zip(x.par_chunks(COPY_CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
        v
    }

    /// Gives a buffer back to the pool.
    pub fn recycle(&self, v: Vec<T>) {
        if v.capacity() > 0 {
            self.floats.give(v);
        }
    }

    /// `n` i32s with unspecified contents, for a product that writes every one of them.
    pub fn sums(&self, n: usize) -> Vec<i32> {
        reused_vec(&self.sums, n)
    }

    pub fn recycle_sums(&self, v: Vec<i32>) {
        if v.capacity() > 0 {
            self.sums.give(v);
        }
    }

    /// `n` i8s with unspecified contents, for a quantizer that writes every one of them.
    pub fn int8(&self, n: usize) -> Vec<i8> {
        reused_vec(&self.int8, n)
    }

    pub fn recycle_int8(&self, v: Vec<i8>) {
        if v.capacity() > 0 {
            self.int8.give(v);
        }
    }

    /// An activation buffer for at least `m` tokens of width `k`.
    pub fn activations(&self, m: usize, k: usize) -> QuantizedActivations {
        self.activations
            .take(|a| (a.k() == k && a.capacity() >= m).then_some(a.capacity()))
            .unwrap_or_else(|| QuantizedActivations::new(m, k))
    }

    pub fn recycle_activations(&self, a: QuantizedActivations) {
        self.activations.give(a);
    }

    /// `n` i16s with unspecified contents, for a quantizer that writes every one of them.
    pub fn int16(&self, n: usize) -> Vec<i16> {
        reused_vec(&self.int16, n)
    }

    pub fn recycle_int16(&self, v: Vec<i16>) {
        if v.capacity() > 0 {
            self.int16.give(v);
        }
    }

    /// A packed-pairs buffer to `repack` (any pooled one: its allocation is reused).
    pub fn pairs(&self) -> PackedPairs {
        self.pairs.take(|_| Some(0)).unwrap_or_default()
    }

    pub fn recycle_pairs(&self, p: PackedPairs) {
        self.pairs.give(p);
    }
}

/// A pointer that parallel tasks share, each writing only its own disjoint part.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
// SAFETY: users promise disjoint writes (documented where it is used).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}
impl<T> SharedMut<T> {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub fn get(&self) -> *mut T {
        self.0
    }
}

/// A read-only pointer shared by parallel tasks.
#[derive(Clone, Copy)]
pub struct SharedConst<T>(pub *const T);
// SAFETY: only read while no one writes it.
unsafe impl<T> Send for SharedConst<T> {}
unsafe impl<T> Sync for SharedConst<T> {}
impl<T> SharedConst<T> {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub fn get(&self) -> *const T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn transpose(x: &[f64], r: usize, c: usize) -> Vec<f64> {
        let mut t = vec![0.0; x.len()];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = x[i * c + j];
            }
        }
        t
    }

    #[test]
    fn matmul_all_transpose_combinations() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        for (ao, bo) in [
            (Operand::n(&a, m, k), Operand::n(&b, k, n)),
            (Operand::t(&at, k, m), Operand::n(&b, k, n)),
            (Operand::n(&a, m, k), Operand::t(&bt, n, k)),
            (Operand::t(&at, k, m), Operand::t(&bt, n, k)),
        ] {
            let mut c = vec![1.0; m * n];
            matmul(&mut c, ao, bo, false, true);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-12);
            }
            matmul(&mut c, ao, bo, true, false);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 2.0 * y).abs() < 1e-12);
            }
        }
    }
}
