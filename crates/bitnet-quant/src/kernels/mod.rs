//! Ternary × int8 and int8 × int8 kernels, chosen at run time.
//!
//! Every product has one definition, the scalar reference over row-major codes
//! ([`crate::ternary::reference_gemv_i32`], [`crate::int8::reference_gemv_i32`]); each SIMD path
//! must give the same integers. The path is picked once per process: the best one the CPU has,
//! unless the environment variable `BITNET_KERNEL` names another
//! (`scalar | avx2 | avx512 | avx512bw | avx512vnni | neon | neon-plain | neon-dotprod`).
//! A path the CPU lacks falls back to the best one, with a warning on stderr.
//!
//! Work is split by output rows over rayon's global pool; products too small to pay for the
//! hand-off run on the calling thread. The kernels allocate nothing.

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

pub(crate) mod scalar;

/// How far ahead of their reads the x86 GEMVs ask for weights (six 512-byte steps of eight
/// rows). The ternary kernel computes about as fast as one core streams from DRAM, and the
/// hardware prefetcher alone leaves the two unoverlapped: with the hint one Zen 3 core went
/// from 12.3 to 15.5 GB/s and two from 18.3 to 22.6 (`layer_sweep` bench, alternated; 1.5–6 KiB
/// all helped, 3 KiB best). The int8 and 6-bit GEMVs read their groups as one stream too and
/// take the same distance (int8 head on the 16-core Xeon, AVX2: 2.6 → 1.9 ms).
#[cfg(target_arch = "x86_64")]
pub(crate) const GEMV_PREFETCH_BYTES: usize = 6 * crate::layout::ROW_TILE * crate::layout::BLOCK_BYTES;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

/// A kernel implementation. Paths of other architectures exist on every target so that names
/// parse everywhere; they are simply never available there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Plain Rust over the packed layout; runs everywhere.
    Scalar,
    /// x86-64 AVX2: `vpmaddubsw` on 2-bit codes, then `vpmaddwd` to i32.
    Avx2,
    /// x86-64 AVX-512 F+BW without VNNI: `vpmaddubsw` on 64-byte vectors.
    Avx512Bw,
    /// x86-64 AVX-512 F+BW+VNNI: `vpdpbusd` (u8 × i8 summed straight into i32).
    Avx512Vnni,
    /// aarch64 NEON without the dot-product extension: `smlal` to i16, `sadalp` to i32.
    NeonPlain,
    /// aarch64 NEON with `dotprod`: `sdot`.
    NeonDotprod,
}

impl KernelPath {
    /// Every path, from the most portable to the most specialised.
    pub const ALL: [KernelPath; 6] = [
        KernelPath::Scalar,
        KernelPath::Avx2,
        KernelPath::Avx512Bw,
        KernelPath::Avx512Vnni,
        KernelPath::NeonPlain,
        KernelPath::NeonDotprod,
    ];

    /// The name `BITNET_KERNEL` accepts for exactly this path.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512Bw => "avx512bw",
            KernelPath::Avx512Vnni => "avx512vnni",
            KernelPath::NeonPlain => "neon-plain",
            KernelPath::NeonDotprod => "neon-dotprod",
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            KernelPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Bw => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni => {
                KernelPath::Avx512Bw.is_available() && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            KernelPath::NeonPlain => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            KernelPath::NeonDotprod => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The paths this CPU can run, from the most portable to the best.
    pub fn available() -> Vec<KernelPath> {
        Self::ALL.into_iter().filter(|p| p.is_available()).collect()
    }

    /// The fastest path this CPU can run.
    pub fn best() -> KernelPath {
        Self::ALL.into_iter().rev().find(|p| p.is_available()).unwrap_or(KernelPath::Scalar)
    }

    /// Parses a `BITNET_KERNEL` value. A family name (`avx512`, `neon`) means the best
    /// available member of the family, or its most specialised member if none is available.
    pub fn parse(name: &str) -> Option<KernelPath> {
        let name = name.trim().to_ascii_lowercase();
        let best_of = |family: [KernelPath; 2]| {
            if family[1].is_available() || !family[0].is_available() {
                family[1]
            } else {
                family[0]
            }
        };
        match name.as_str() {
            "avx512" => Some(best_of([KernelPath::Avx512Bw, KernelPath::Avx512Vnni])),
            "neon" => Some(best_of([KernelPath::NeonPlain, KernelPath::NeonDotprod])),
            _ => Self::ALL.into_iter().find(|p| p.name() == name),
        }
    }

    /// The path every product without an explicit path uses: `BITNET_KERNEL` if it names an
    /// available path, else the best one. Decided once per process.
    pub fn active() -> KernelPath {
        static ACTIVE: OnceLock<KernelPath> = OnceLock::new();
        *ACTIVE.get_or_init(|| match std::env::var("BITNET_KERNEL") {
            Err(_) => Self::best(),
            Ok(value) => Self::choose(&value),
        })
    }

    /// The path a `BITNET_KERNEL` value selects, warning when it cannot be honoured.
    fn choose(value: &str) -> KernelPath {
        let best = Self::best();
        match Self::parse(value) {
            Some(p) if p.is_available() => p,
            Some(p) => {
                eprintln!(
                    "bitnet-quant: BITNET_KERNEL={value}: this CPU cannot run the {} kernels; using {}",
                    p.name(),
                    best.name()
                );
                best
            }
            None => {
                eprintln!(
                    "bitnet-quant: BITNET_KERNEL={value} is not one of scalar, avx2, avx512, avx512bw, \
                     avx512vnni, neon, neon-plain, neon-dotprod; using {}",
                    best.name()
                );
                best
            }
        }
    }

    /// `self` if this CPU can run it, else the best path: the guard that keeps every dispatch
    /// from executing instructions the CPU lacks.
    pub(crate) fn or_best(self) -> KernelPath {
        if self.is_available() {
            self
        } else {
            Self::best()
        }
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a kernel writes the result for token `t`, output row `r`: `acc` is the finished
/// integer dot product `Σ_c x[t, c] · W[r, c]`.
pub(crate) trait Sink: Sync {
    fn put(&self, t: usize, r: usize, acc: i32);

    /// `put(t, r0 + i, accs[i] - sub)` for every `i`: a run of rows of one token, which the
    /// sinks write in one loop that the compiler can vectorise. (Only the x86 kernels use it.)
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn put_run(&self, t: usize, r0: usize, accs: &[i32], sub: i32) {
        for (i, &acc) in accs.iter().enumerate() {
            self.put(t, r0 + i, acc - sub);
        }
    }
}

/// A `[m, n]` token-major output that tasks owning disjoint rows write into concurrently.
pub(crate) struct SharedOut<'a, T> {
    ptr: *mut T,
    len: usize,
    n: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the drivers below hand each output row to exactly one task, so no two threads
// ever write the same element, and nobody reads the buffer while the product runs.
unsafe impl<T: Send> Send for SharedOut<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedOut<'_, T> {}

impl<'a, T> SharedOut<'a, T> {
    pub(crate) fn new(out: &'a mut [T], n: usize) -> Self {
        Self { ptr: out.as_mut_ptr(), len: out.len(), n, _borrow: std::marker::PhantomData }
    }

    #[inline]
    pub(crate) fn write(&self, t: usize, r: usize, v: T) {
        let i = t * self.n + r;
        assert!(r < self.n && i < self.len, "kernel output index out of range");
        // SAFETY: `i` is in bounds (checked above) and is written by one task only (see the
        // `Sync` impl).
        unsafe { self.ptr.add(i).write(v) }
    }

    /// The value at (`t`, `r`): for a product that adds into what the output holds. Only the
    /// task that owns the element reads it, before it writes it.
    #[inline]
    pub(crate) fn read(&self, t: usize, r: usize) -> T
    where
        T: Copy,
    {
        let i = t * self.n + r;
        assert!(r < self.n && i < self.len, "kernel output index out of range");
        // SAFETY: in bounds (checked above); the element belongs to the calling task (see the
        // `Sync` impl), which is not writing it concurrently.
        unsafe { self.ptr.add(i).read() }
    }

    /// Copies rows `r0..r0 + dst.len()` of token `t` into `dst` (for a product that adds into
    /// the output; only the task that owns the elements reads them). (Only the x86 kernels use
    /// it.)
    #[inline]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn read_run(&self, t: usize, r0: usize, dst: &mut [T])
    where
        T: Copy,
    {
        let start = t * self.n + r0;
        assert!(
            r0 + dst.len() <= self.n && start + dst.len() <= self.len,
            "kernel output index out of range"
        );
        // SAFETY: in bounds (checked above); the elements belong to the calling task, which is
        // not writing them concurrently.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(start), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `src` to rows `r0..r0 + src.len()` of token `t`.
    #[inline]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn write_slice(&self, t: usize, r0: usize, src: &[T])
    where
        T: Copy,
    {
        let start = t * self.n + r0;
        assert!(
            r0 + src.len() <= self.n && start + src.len() <= self.len,
            "kernel output index out of range"
        );
        // SAFETY: in bounds (checked above), and written by one task only (see the `Sync` impl).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(start), src.len()) }
    }

    /// Writes `f(i)` to row `r0 + i` of token `t` for `i < len`.
    #[inline]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn write_run(&self, t: usize, r0: usize, len: usize, f: impl Fn(usize) -> T) {
        let start = t * self.n + r0;
        assert!(r0 + len <= self.n && start + len <= self.len, "kernel output index out of range");
        for i in 0..len {
            // SAFETY: `start + i < start + len <= len` (checked above), and these elements are
            // written by one task only (see the `Sync` impl).
            unsafe { self.ptr.add(start + i).write(f(i)) }
        }
    }
}

/// Integer outputs.
pub(crate) struct I32Sink<'a>(pub(crate) SharedOut<'a, i32>);

impl Sink for I32Sink<'_> {
    #[inline]
    fn put(&self, t: usize, r: usize, acc: i32) {
        self.0.write(t, r, acc)
    }

    #[inline]
    fn put_run(&self, t: usize, r0: usize, accs: &[i32], sub: i32) {
        self.0.write_run(t, r0, accs.len(), |i| accs[i] - sub)
    }
}

/// Float outputs `f(acc, t, r)`: the scales are applied as each dot product finishes.
pub(crate) struct MapSink<'a, F>(pub(crate) SharedOut<'a, f32>, pub(crate) F);

impl<F: Fn(i32, usize, usize) -> f32 + Sync> Sink for MapSink<'_, F> {
    #[inline]
    fn put(&self, t: usize, r: usize, acc: i32) {
        self.0.write(t, r, (self.1)(acc, t, r))
    }

    #[inline]
    fn put_run(&self, t: usize, r0: usize, accs: &[i32], sub: i32) {
        self.0.write_run(t, r0, accs.len(), |i| (self.1)(accs[i] - sub, t, r0 + i))
    }
}

/// Multiply-accumulates below which a GEMM runs on the calling thread: waking the pool costs a
/// few microseconds, about what one core needs for this much work.
pub(crate) const PARALLEL_MIN_MACS: usize = 1 << 19;

/// The same for a GEMV (one token), which is cheaper per multiply-add: below 4 Mi MACs (the
/// 640-row k/v projections of 2B-4T, 0.4 MB of weights, ~20 µs on one core) the hand-off is not
/// worth it. Quiet, splitting them saved ~10 µs each; with other processes on the cores, each
/// fork-join risks waiting a whole scheduler slice for a preempted helper, so a decoded token
/// should cross as few of them as possible.
pub(crate) const PARALLEL_MIN_MACS_GEMV: usize = 1 << 22;

/// Runs `f` over `0..units` cut into contiguous ranges, on rayon's pool when `macs` (the work)
/// is at least `min_macs` and there is more than one thread, else on the calling thread.
pub(crate) fn for_ranges(units: usize, macs: usize, min_macs: usize, f: impl Fn(Range<usize>) + Sync) {
    let threads = bitnet_core::threads::parallel_threads();
    if units == 0 {
        return;
    }
    if threads <= 1 || units == 1 || macs < min_macs {
        f(0..units);
        return;
    }
    // A few ranges per thread even out the load when other processes share the cores: rayon
    // splits the list in halves, so an idle thread steals whatever a preempted one has not
    // started, and only the range in progress can hold up the join.
    let tasks = (threads * 4).min(units);
    (0..tasks).into_par_iter().for_each(|i| f(i * units / tasks..(i + 1) * units / tasks));
}
