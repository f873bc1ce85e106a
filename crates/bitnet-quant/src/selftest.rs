//! Equality checks of a kernel path against the scalar reference, on random, ragged and
//! extreme inputs: the test suite runs them for every path this CPU has, and
//! `examples/kernel_check.rs` runs them on a new machine (e.g. one with AVX-512) and says
//! which paths it exercised.
//!
//! Integer outputs must be equal, and float outputs must be bit-identical to
//! `WeightScale::apply(reference_acc, s_a)` (or `acc / s_a · scale[r]` for int8).

use crate::int8::{self, Int8Matrix};
use crate::ternary::{self, QuantizedActivations, TernaryMatrix, WeightScale};
use crate::KernelPath;

/// Token counts every path is checked with: ragged, and around the AVX2 GEMM's switch to panels
/// at 24 tokens, its 6-token microkernel (tails of 1 to 5) and 128-token block.
pub const MS: [usize; 15] = [1, 2, 3, 5, 7, 12, 13, 16, 23, 24, 30, 33, 35, 64, 129];
/// Widths every path is checked with: ragged, block-sized, and the 2B-4T model's.
pub const KS: [usize; 12] = [1, 31, 32, 127, 128, 129, 255, 256, 1000, 2304, 2560, 6912];
/// Output rows: odd, below, at and above the row tile.
pub const NS: [usize; 5] = [1, 7, 9, 17, 67];

/// A small deterministic generator (SplitMix64), so that a failure reproduces anywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i32
    }
}

/// How the activations of a case are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Uniform int8 in [-128, 127].
    Random,
    /// All -128: with weights +1 this reaches the most negative i16 partial sums.
    Min,
    /// All 127.
    Max,
    /// -128 and 127 alternating.
    Alternating,
}

impl Fill {
    pub const ALL: [Fill; 4] = [Fill::Random, Fill::Min, Fill::Max, Fill::Alternating];

    fn draw(self, rng: &mut Rng, i: usize) -> i8 {
        match self {
            Fill::Random => rng.range(-128, 127) as i8,
            Fill::Min => -128,
            Fill::Max => 127,
            Fill::Alternating => [-128, 127][i % 2],
        }
    }
}

/// One shape and fill.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub fill: Fill,
    pub seed: u64,
}

/// The cases a full check runs: every (M, K) with an N from [`NS`] and random activations,
/// plus extreme activations on selected shapes.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (i, &m) in MS.iter().enumerate() {
        for (j, &k) in KS.iter().enumerate() {
            let n = NS[(i + j) % NS.len()];
            out.push(Case { m, k, n, fill: Fill::Random, seed: (i * 100 + j) as u64 });
        }
    }
    for fill in [Fill::Min, Fill::Max, Fill::Alternating] {
        for (m, k, n) in
            [(1, 2048, 9), (3, 2304, 17), (9, 6912, 8), (1, 129, 3), (33, 4096, 7), (25, 2048, 50)]
        {
            out.push(Case { m, k, n, fill, seed: 7 });
        }
    }
    out
}

fn activations(case: &Case, rng: &mut Rng) -> (QuantizedActivations, Vec<i8>) {
    let q: Vec<i8> = (0..case.m * case.k).map(|i| case.fill.draw(rng, i)).collect();
    let scales: Vec<f32> = (0..case.m).map(|i| 0.5 + i as f32 * 0.37).collect();
    let mut x = QuantizedActivations::new(case.m, case.k);
    // Shapes are consistent by construction.
    x.set_int8(&q, &scales, case.m).expect("activation shape");
    (x, q)
}

/// Ternary weights for a case: random, except that extreme activations get all +1 weights on
/// even seeds' first half of rows and all -1 on the rest, the worst case for the i16 sums.
fn ternary_weights(case: &Case, rng: &mut Rng) -> Vec<i8> {
    let (n, k) = (case.n, case.k);
    (0..n * k)
        .map(|i| match case.fill {
            Fill::Random => rng.range(-1, 1) as i8,
            _ if i / k < n / 2 => 1,
            _ if i / k == n / 2 => rng.range(-1, 1) as i8,
            _ => -1,
        })
        .collect()
}

/// Weights in `[-max, max]`: random, or (extreme fills) rows of `max` and `-max`.
fn int_weights(case: &Case, rng: &mut Rng, max: i32) -> Vec<i8> {
    let (n, k) = (case.n, case.k);
    (0..n * k)
        .map(|i| match case.fill {
            Fill::Random => rng.range(-max, max) as i8,
            _ if i / k < n / 2 => max as i8,
            _ if i / k == n / 2 => rng.range(-max, max) as i8,
            _ => -max as i8,
        })
        .collect()
}

fn describe(
    kind: &str,
    path: KernelPath,
    case: &Case,
    t: usize,
    r: usize,
    got: String,
    want: String,
) -> String {
    format!(
        "{kind} on {path}: M={} K={} N={} fill={:?} seed={}: out[token {t}, row {r}] = {got}, reference {want}",
        case.m, case.k, case.n, case.fill, case.seed
    )
}

/// Checks the ternary product on `path` for one case: integers and floats.
pub fn check_ternary(path: KernelPath, case: &Case) -> Result<(), String> {
    let mut rng = Rng::new(case.seed ^ 0x7E27);
    let (x, q) = activations(case, &mut rng);
    let codes = ternary_weights(case, &mut rng);
    let scale =
        if case.seed.is_multiple_of(2) { WeightScale::Multiply(0.731) } else { WeightScale::Divide(1.37) };
    let w = TernaryMatrix::from_ternary(&codes, case.n, case.k, scale).map_err(|e| e.to_string())?;
    let mut want = vec![0i32; case.n];
    let mut got = vec![0i32; case.m * case.n];
    let mut got_f = vec![0f32; case.m * case.n];
    w.matmul_i32_with(path, &x, &mut got);
    w.forward_with(path, &x, &mut got_f);
    for t in 0..case.m {
        ternary::reference_gemv_i32(&codes, case.n, case.k, &q[t * case.k..(t + 1) * case.k], &mut want);
        for r in 0..case.n {
            let (g, wv) = (got[t * case.n + r], want[r]);
            if g != wv {
                return Err(describe("ternary i32", path, case, t, r, g.to_string(), wv.to_string()));
            }
            let (gf, wf) = (got_f[t * case.n + r], scale.apply(wv, x.scale(t)));
            if gf.to_bits() != wf.to_bits() {
                return Err(describe("ternary f32", path, case, t, r, gf.to_string(), wf.to_string()));
            }
        }
    }
    Ok(())
}

/// Checks the int8 product on `path` for one case: integers and floats.
pub fn check_int8(path: KernelPath, case: &Case) -> Result<(), String> {
    check_int(path, case, 8)
}

/// Checks the 6-bit product on `path` for one case: integers and floats.
pub fn check_int6(path: KernelPath, case: &Case) -> Result<(), String> {
    check_int(path, case, 6)
}

fn check_int(path: KernelPath, case: &Case, bits: u32) -> Result<(), String> {
    let mut rng = Rng::new(case.seed ^ 0x1878 ^ bits as u64);
    let (x, q) = activations(case, &mut rng);
    let max = (1 << (bits - 1)) - 1;
    let wq = int_weights(case, &mut rng, max);
    let scales: Vec<f32> = (0..case.n).map(|r| 0.01 + r as f32 * 0.003).collect();
    let w = match bits {
        8 => Int8Matrix::from_int8(&wq, &scales, case.n, case.k),
        _ => Int8Matrix::from_int6(&wq, &scales, case.n, case.k),
    }
    .map_err(|e| e.to_string())?;
    let kind = if bits == 8 { "int8" } else { "int6" };
    let mut want = vec![0i32; case.n];
    let mut got = vec![0i32; case.m * case.n];
    let mut got_f = vec![0f32; case.m * case.n];
    w.matmul_i32_with(path, &x, &mut got);
    w.forward_with(path, &x, &mut got_f);
    for t in 0..case.m {
        int8::reference_gemv_i32(&wq, case.n, case.k, &q[t * case.k..(t + 1) * case.k], &mut want);
        for r in 0..case.n {
            let (g, wv) = (got[t * case.n + r], want[r]);
            if g != wv {
                return Err(describe(
                    &format!("{kind} i32"),
                    path,
                    case,
                    t,
                    r,
                    g.to_string(),
                    wv.to_string(),
                ));
            }
            let (gf, wf) = (got_f[t * case.n + r], (wv as f32 / x.scale(t)) * scales[r]);
            if gf.to_bits() != wf.to_bits() {
                return Err(describe(
                    &format!("{kind} f32"),
                    path,
                    case,
                    t,
                    r,
                    gf.to_string(),
                    wf.to_string(),
                ));
            }
        }
    }
    Ok(())
}

/// Runs every case of [`cases`] on `path`, ternary, int8 and 6-bit. Returns the number of products
/// checked, or every mismatch found.
pub fn check_path(path: KernelPath) -> Result<usize, Vec<String>> {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases() {
        for result in [check_ternary(path, &case), check_int8(path, &case), check_int6(path, &case)] {
            checked += 1;
            if let Err(e) = result {
                failures.push(e);
            }
        }
    }
    if failures.is_empty() {
        Ok(checked)
    } else {
        Err(failures)
    }
}
