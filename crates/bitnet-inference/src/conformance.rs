//! The backend conformance suite: every [`Backend`] operation, on ragged shapes, against
//! [`CpuBackend`], the definition.
//!
//! [`check_backend`] runs each operation on both backends from the same inputs and compares
//! what comes back. Integer work must agree exactly: per-token quantization (codes and scales),
//! BitLinear and the int8 head (from the same int8 inputs, the same i32 sums scaled by the same
//! float operations, so the outputs are bit-equal), embeddings, gathers, adds and value stores.
//! Float work whose summation order is the backend's own is held to the bounds below.
//! Cases cover batches of 1 to `max_batch` rows, widths that are not multiples of any tile,
//! GQA ratios 1, 3 and 4, head sizes 32 to 128, several sequences in one call with `pos0 > 0`,
//! block tables in shuffled order, and every [`KvType`].
//!
//! ggml's `test-backend-ops` and candle's `test_device!` are the models. A backend crate calls
//! it from a test: `check_backend(|| MyBackend::new()).unwrap()`; the error lists every
//! mismatch with the operation, the case and the first differing value.

use std::cmp::Ordering;

use bitnet_core::dense::{DenseData, DenseMatrix};
use bitnet_models::Activation;
use bitnet_quant::dense::DenseFormat;
use bitnet_quant::{DenseLinear, Int8Matrix, TernaryMatrix, WeightScale};

use crate::backend::{AttentionSegment, Backend, BackendError, HeadShape};
use crate::cpu::CpuBackend;
use crate::kv::{KvType, BLOCK_TOKENS};

/// RMSNorm, RoPE and the gate: each value within this much of the reference, relative to the
/// row's largest magnitude (a few ulps of rounding: a square sum in another order, a library
/// `exp` that differs in the last bit).
pub const ROW_RTOL: f32 = 4e-6;
/// Attention: each output within this much of the reference, relative to the largest value
/// (a softmax and weighted sum over the context in another order).
pub const ATTENTION_RTOL: f32 = 2e-5;
/// lm_head: each logit within this much of `Σ_c |w_c · x_c|` (a dot product in another order).
pub const LM_HEAD_RTOL: f32 = 1e-5;
/// Fused norm or gate into int8: a float a few ulps away can round to the next code when it
/// sits on a .5 boundary. At most this fraction of the codes may differ, by one step, with
/// scales within [`ROW_RTOL`].
pub const QUANT_FLIP_FRACTION: f64 = 0.01;

/// One mismatch: the operation, the case, and what differed.
#[derive(Clone, Debug)]
pub struct Failure {
    pub op: &'static str,
    pub case: String,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]: {}", self.op, self.case, self.detail)
    }
}

/// What a passing run covered.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Comparisons made (one per operation call and output).
    pub checks: usize,
    /// Weight formats the backend refused with [`BackendError::Unsupported`] (a model holding
    /// them fails to load on it with that error, which is allowed; a wrong result is not).
    pub unsupported: Vec<String>,
}

/// How far the suite goes.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The largest batch of rows a row-wise operation is run with.
    pub max_batch: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { max_batch: 40 }
    }
}

/// Runs every operation of the backend `make` builds against [`CpuBackend`] with the default
/// [`Options`]. `Err` lists every mismatch.
pub fn check_backend<B: Backend>(make: impl Fn() -> B) -> Result<Report, Vec<Failure>> {
    check_backend_with(make, Options::default())
}

/// [`check_backend`] with chosen [`Options`].
pub fn check_backend_with<B: Backend>(make: impl Fn() -> B, opts: Options) -> Result<Report, Vec<Failure>> {
    let mut s = Suite {
        cpu: CpuBackend::new(),
        dev: make(),
        opts,
        failures: Vec::new(),
        checks: 0,
        unsupported: Vec::new(),
    };
    s.embedding_and_gather();
    s.transfers();
    s.argmax_rows();
    s.row_ops();
    s.quantizers();
    s.bitlinear();
    s.int8_linear();
    s.rope();
    for kv_type in [KvType::F32, KvType::Bf16, KvType::F16] {
        s.kv_and_attention(kv_type);
    }
    s.lm_head();
    s.dense_linear();
    if s.failures.is_empty() {
        Ok(Report { checks: s.checks, unsupported: s.unsupported })
    } else {
        Err(s.failures)
    }
}

/// A deterministic xorshift stream of test values.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-amp, amp).
    fn float(&mut self, amp: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
    }
    fn floats(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.float(amp)).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// Integers in [lo, hi].
    fn ints(&mut self, n: usize, lo: i32, hi: i32) -> Vec<i8> {
        (0..n).map(|_| (lo + self.below((hi - lo + 1) as usize) as i32) as i8).collect()
    }
}

/// Row counts from 1 to `max`: every small batch, the edges of 8- and 16-row tiles, and `max`.
fn batch_sizes(max: usize) -> Vec<usize> {
    let mut v: Vec<usize> =
        [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, max].into_iter().filter(|&m| m <= max).collect();
    v.dedup();
    v
}

fn dense(rows: usize, cols: usize, values: &[f32], dtype: &str) -> DenseMatrix {
    let data = match dtype {
        "f32" => DenseData::F32(values.to_vec()),
        "bf16" => DenseData::Bf16(values.iter().map(|&x| half::bf16::from_f32(x)).collect()),
        _ => DenseData::F16(values.iter().map(|&x| half::f16::from_f32(x)).collect()),
    };
    DenseMatrix { rows, cols, data }
}

struct Suite<B: Backend> {
    cpu: CpuBackend,
    dev: B,
    opts: Options,
    failures: Vec<Failure>,
    checks: usize,
    unsupported: Vec<String>,
}

/// A buffer of `len` on `b` holding `data` at its start.
fn buffer_with<B: Backend>(b: &mut B, len: usize, data: &[f32]) -> Result<B::Buffer, BackendError> {
    let mut buf = b.buffer(len)?;
    b.write(&mut buf, 0, data)?;
    Ok(buf)
}

fn read_back<B: Backend>(b: &mut B, buf: &B::Buffer, len: usize) -> Result<Vec<f32>, BackendError> {
    b.synchronize()?;
    let mut out = vec![0.0; len];
    b.read(buf, 0, &mut out)?;
    Ok(out)
}

fn read_quant_back<B: Backend>(
    b: &mut B,
    q: &B::QuantBuffer,
    rows: usize,
    width: usize,
) -> Result<(Vec<i8>, Vec<f32>), BackendError> {
    b.synchronize()?;
    let (mut codes, mut scales) = (vec![0i8; rows * width], vec![0.0; rows]);
    b.read_quant(q, &mut codes, &mut scales)?;
    Ok((codes, scales))
}

impl<B: Backend> Suite<B> {
    fn fail(&mut self, op: &'static str, case: String, detail: String) {
        self.failures.push(Failure { op, case, detail });
    }

    /// Records a backend error of `op` as a failure; `None` when there was one.
    fn ok<T>(&mut self, op: &'static str, case: &str, r: Result<T, BackendError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(op, case.to_string(), format!("backend error: {e}"));
                None
            }
        }
    }

    /// Bit-equal values.
    fn exact(&mut self, op: &'static str, case: String, got: &[f32], want: &[f32]) {
        self.checks += 1;
        if got.len() != want.len() {
            return self.fail(op, case, format!("{} values, expected {}", got.len(), want.len()));
        }
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            let diff = got.iter().zip(want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
            self.fail(
                op,
                case,
                format!("[{i}] = {} but the CPU gives {} ({diff} values differ)", got[i], want[i]),
            );
        }
    }

    /// `|got - want| <= tol(i)` for every value, NaN never passing.
    fn close(
        &mut self,
        op: &'static str,
        case: String,
        got: &[f32],
        want: &[f32],
        tol: impl Fn(usize) -> f32,
    ) {
        self.checks += 1;
        if got.len() != want.len() {
            return self.fail(op, case, format!("{} values, expected {}", got.len(), want.len()));
        }
        // NaN is never within the bound.
        let within = |i: usize| {
            matches!((got[i] - want[i]).abs().partial_cmp(&tol(i)), Some(Ordering::Less | Ordering::Equal))
        };
        let bad = (0..got.len()).find(|&i| !within(i));
        if let Some(i) = bad {
            let (g, w) = (got[i], want[i]);
            self.fail(
                op,
                case,
                format!("[{i}] = {g} but the CPU gives {w}: off by {} > {}", (g - w).abs(), tol(i)),
            );
        }
    }

    /// Values within `rtol` of the largest magnitude of their row of `width`.
    fn close_rows(
        &mut self,
        op: &'static str,
        case: String,
        got: &[f32],
        want: &[f32],
        width: usize,
        rtol: f32,
    ) {
        let row_max: Vec<f32> =
            want.chunks(width.max(1)).map(|r| r.iter().fold(0.0f32, |m, v| m.max(v.abs()))).collect();
        self.close(op, case, got, want, |i| rtol * row_max[i / width.max(1)].max(f32::MIN_POSITIVE));
    }

    /// Quantized rows: scales within [`ROW_RTOL`], codes equal, except (`flips`) one step on at
    /// most [`QUANT_FLIP_FRACTION`] of them.
    #[allow(clippy::too_many_arguments)]
    fn quant_rows(
        &mut self,
        op: &'static str,
        case: String,
        got: &(Vec<i8>, Vec<f32>),
        want: &(Vec<i8>, Vec<f32>),
        flips: bool,
    ) {
        self.checks += 1;
        let ((gq, gs), (wq, ws)) = (got, want);
        let scale_ok = |i: usize| {
            if flips {
                (gs[i] - ws[i]).abs() <= ROW_RTOL * ws[i]
            } else {
                gs[i].to_bits() == ws[i].to_bits()
            }
        };
        if let Some(i) = (0..ws.len()).find(|&i| !scale_ok(i)) {
            return self.fail(op, case, format!("token {i}: scale {} but the CPU gives {}", gs[i], ws[i]));
        }
        let differ: Vec<usize> = (0..wq.len()).filter(|&i| gq[i] != wq[i]).collect();
        let far = differ.iter().find(|&&i| (gq[i] as i32 - wq[i] as i32).abs() > 1);
        let allowed = if flips { (QUANT_FLIP_FRACTION * wq.len() as f64) as usize } else { 0 };
        if let Some(&i) = far.or(if differ.len() > allowed { differ.first() } else { None }) {
            self.fail(
                op,
                case,
                format!(
                    "code [{i}] = {} but the CPU gives {} ({} of {} codes differ)",
                    gq[i],
                    wq[i],
                    differ.len(),
                    wq.len()
                ),
            );
        }
    }

    fn embedding_and_gather(&mut self) {
        let mut rng = Rng::new(1);
        let (vocab, width) = (53, 70);
        let values = rng.floats(vocab * width, 3.0);
        for dtype in ["f32", "bf16", "f16"] {
            let table = dense(vocab, width, &values, dtype);
            let case = format!("{dtype} table {vocab}×{width}");
            let (Some(ct), Some(dt)) = (
                self.ok("upload_dense", &case, self.cpu.upload_dense(table.clone())),
                self.ok("upload_dense", &case, self.dev.upload_dense(table)),
            ) else {
                continue;
            };
            for m in batch_sizes(self.opts.max_batch) {
                let ids: Vec<u32> = (0..m).map(|_| rng.below(vocab) as u32).collect();
                let case = format!("{dtype} table, {m} rows");
                let want = embedding_on(&mut self.cpu, &ct, &ids, width);
                let got = embedding_on(&mut self.dev, &dt, &ids, width);
                if let (Some(w), Some(g)) =
                    (self.ok("embedding", &case, want), self.ok("embedding", &case, got))
                {
                    self.exact("embedding", case.clone(), &g, &w);
                }
                // Gather a shuffled subset of those rows, as the logits step does.
                let rows: Vec<u32> = (0..m.div_ceil(2)).map(|_| rng.below(m) as u32).collect();
                let src = {
                    let mut out = vec![0.0; m * width];
                    ids.iter()
                        .enumerate()
                        .for_each(|(t, &id)| table_row(&values, width, id, dtype, &mut out[t * width..]));
                    out
                };
                let want: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| src[r as usize * width..(r as usize + 1) * width].to_vec())
                    .collect();
                let dev = &mut self.dev;
                let got = (|| {
                    let x = buffer_with(dev, m * width, &src)?;
                    let mut out = dev.buffer(rows.len() * width)?;
                    dev.gather_rows(&x, &rows, width, &mut out);
                    read_back(dev, &out, rows.len() * width)
                })();
                if let Some(g) = self.ok("gather_rows", &case, got) {
                    self.exact("gather_rows", case, &g, &want);
                }
            }
        }
    }

    /// Greedy choices: random rows, ties (the first wins), NaN first (0) and inside (skipped),
    /// rows of -inf, signed zeros, widths of 1 to a vocabulary's.
    fn argmax_rows(&mut self) {
        let mut rng = Rng::new(12);
        for width in [1, 7, 1000, 4099, 32003] {
            let mut rows: Vec<Vec<f32>> = (0..5).map(|_| rng.floats(width, 8.0)).collect();
            let mut tie = rng.floats(width, 1.0);
            for i in (width / 3..width).step_by(width / 4 + 1) {
                tie[i] = 9.0;
            }
            rows.push(tie);
            let mut nan_first = rng.floats(width, 1.0);
            nan_first[0] = f32::NAN;
            rows.push(nan_first);
            let mut nan_inside = rng.floats(width, 1.0);
            nan_inside[width / 2] = f32::NAN;
            rows.push(nan_inside);
            rows.push(vec![f32::NEG_INFINITY; width]);
            rows.push((0..width).map(|i| if i % 2 == 0 { -0.0 } else { 0.0 }).collect());
            let mut inf = rng.floats(width, 1.0);
            inf[width - 1] = f32::INFINITY;
            rows.push(inf);
            let flat: Vec<f32> = rows.concat();
            let n = rows.len();
            let case = format!("{n} rows of {width}");
            let mut want = vec![0u32; n];
            let cpu_x =
                self.cpu.buffer(flat.len()).and_then(|mut b| self.cpu.write(&mut b, 0, &flat).map(|_| b));
            let want = cpu_x.and_then(|x| self.cpu.argmax_rows(&x, width, &mut want).map(|_| want));
            let dev = &mut self.dev;
            let got = (|| {
                let x = buffer_with(dev, flat.len(), &flat)?;
                let mut got = vec![u32::MAX; n];
                dev.argmax_rows(&x, width, &mut got)?;
                Ok(got)
            })();
            let (Some(w), Some(g)) =
                (self.ok("argmax_rows", &case, want), self.ok("argmax_rows", &case, got))
            else {
                continue;
            };
            self.checks += 1;
            if let Some(r) = (0..n).find(|&r| g[r] != w[r]) {
                self.fail("argmax_rows", case, format!("row {r}: {} but the CPU gives {}", g[r], w[r]));
            }
        }
    }

    /// write and read at offsets, on both kinds of buffer.
    fn transfers(&mut self) {
        let mut rng = Rng::new(2);
        let data = rng.floats(100, 5.0);
        let dev = &mut self.dev;
        let got = (|| {
            let mut b = dev.buffer(130)?;
            dev.write(&mut b, 0, &vec![0.0; 130])?;
            dev.write(&mut b, 17, &data)?;
            dev.synchronize()?;
            let mut out = vec![1.0; 60];
            dev.read(&b, 40, &mut out)?;
            Ok(out)
        })();
        if let Some(g) = self.ok("write/read", "offsets 17 and 40", got) {
            self.exact("write/read", "offsets 17 and 40".into(), &g, &data[23..83]);
        }
        for width in [1, 5, 300] {
            let rows = 3.min(self.opts.max_batch);
            let q = rng.ints(rows * width, -128, 127);
            let scales: Vec<f32> = (0..rows).map(|_| 1.0 + rng.float(0.5)).collect();
            let dev = &mut self.dev;
            let got = (|| {
                let mut b = dev.quant_buffer(rows, width)?;
                dev.write_quant(&q, &scales, &mut b)?;
                read_quant_back(dev, &b, rows, width)
            })();
            let case = format!("width {width}");
            if let Some(g) = self.ok("write_quant/read_quant", &case, got) {
                self.quant_rows("write_quant/read_quant", case, &g, &(q, scales), false);
            }
        }
    }

    /// rmsnorm, gate and add.
    fn row_ops(&mut self) {
        let mut rng = Rng::new(3);
        for width in [1, 7, 64, 300, 2560] {
            let gain = rng.floats(width, 2.0);
            for m in batch_sizes(self.opts.max_batch).into_iter().step_by(2) {
                let x = rng.floats(m * width, 4.0);
                let y = rng.floats(m * width, 4.0);
                for with_gain in [true, false] {
                    let case = format!("{m}×{width}, gain {with_gain}");
                    let g = with_gain.then_some(&gain[..]);
                    let want = rmsnorm_on(&mut self.cpu, &x, g, m, width);
                    let got = rmsnorm_on(&mut self.dev, &x, g, m, width);
                    if let (Some(w), Some(gt)) =
                        (self.ok("rmsnorm", &case, want), self.ok("rmsnorm", &case, got))
                    {
                        self.close_rows("rmsnorm", case, &gt, &w, width, ROW_RTOL);
                    }
                }
                for act in [Activation::Relu2, Activation::Silu, Activation::GeluTanh] {
                    let case = format!("{act:?} {m}×{width}");
                    let want = gate_on(&mut self.cpu, act, &x, &y);
                    let got = gate_on(&mut self.dev, act, &x, &y);
                    if let (Some(w), Some(g)) = (self.ok("gate", &case, want), self.ok("gate", &case, got)) {
                        self.close_rows("gate", case, &g, &w, width, ROW_RTOL);
                    }
                }
                let case = format!("{m}×{width}");
                let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
                let dev = &mut self.dev;
                let got = (|| {
                    let mut a = buffer_with(dev, x.len(), &x)?;
                    let b = buffer_with(dev, y.len(), &y)?;
                    dev.add(&mut a, &b, x.len());
                    read_back(dev, &a, x.len())
                })();
                if let Some(g) = self.ok("add", &case, got) {
                    self.exact("add", case.clone(), &g, &want);
                }
                // sqrt(640), Gemma 3 270M's embedding scale: one f32 product per value.
                let factor = 640f32.sqrt();
                let want: Vec<f32> = x.iter().map(|a| a * factor).collect();
                let dev = &mut self.dev;
                let got = (|| {
                    let mut a = buffer_with(dev, x.len(), &x)?;
                    dev.scale(&mut a, x.len(), factor);
                    read_back(dev, &a, x.len())
                })();
                if let Some(g) = self.ok("scale", &case, got) {
                    self.exact("scale", case, &g, &want);
                }
            }
        }
    }

    /// quantize (exact), norm_quantize and gate_quantize (fused: rare one-step flips).
    fn quantizers(&mut self) {
        let mut rng = Rng::new(4);
        for width in [1, 7, 64, 300, 2560] {
            let gain = rng.floats(width, 2.0);
            for m in batch_sizes(self.opts.max_batch) {
                // Rows of very different magnitudes, one of them all zeros (the 1e-5 floor).
                let mut x: Vec<f32> =
                    (0..m).flat_map(|t| rng.floats(width, 0.01 * 10f32.powi(t as i32 % 5))).collect();
                if m > 2 {
                    x[width..2 * width].fill(0.0);
                }
                if m > 3 {
                    // A row of exact ties: max 127 makes s_a = 1, and every other value is
                    // k + 0.5, which must round to even.
                    let ties = &mut x[3 * width..4 * width];
                    for (c, v) in ties.iter_mut().enumerate() {
                        *v = if c == 0 { 127.0 } else { (c % 61) as f32 - 30.5 };
                    }
                }
                let first = m / 3;
                let rows = m - first;
                let case = format!("rows {first}..{m} of width {width}");
                let want = quantize_on(&mut self.cpu, &x, first, rows, width, m);
                let got = quantize_on(&mut self.dev, &x, first, rows, width, m);
                if let (Some(w), Some(g)) =
                    (self.ok("quantize", &case, want), self.ok("quantize", &case, got))
                {
                    self.quant_rows("quantize", case, &g, &w, false);
                }
                let case = format!("{m}×{width}");
                let want = norm_quantize_on(&mut self.cpu, &x, Some(&gain), m, width);
                let got = norm_quantize_on(&mut self.dev, &x, Some(&gain), m, width);
                if let (Some(w), Some(g)) =
                    (self.ok("norm_quantize", &case, want), self.ok("norm_quantize", &case, got))
                {
                    self.quant_rows("norm_quantize", case.clone(), &g, &w, true);
                }
                // The residual add fused in front: the sum exactly `add`'s, then as above.
                let y = rng.floats(m * width, 0.5);
                let want = add_norm_quantize_on(&mut self.cpu, &x, &y, Some(&gain), m, width);
                let got = add_norm_quantize_on(&mut self.dev, &x, &y, Some(&gain), m, width);
                if let (Some((wx, wq)), Some((gx, gq))) =
                    (self.ok("add_norm_quantize", &case, want), self.ok("add_norm_quantize", &case, got))
                {
                    self.exact("add_norm_quantize sum", case.clone(), &gx, &wx);
                    self.quant_rows("add_norm_quantize", case, &gq, &wq, true);
                }
                let up = rng.floats(m * width, 3.0);
                for (act, sub_norm) in [
                    (Activation::Relu2, true),
                    (Activation::Silu, false),
                    (Activation::Silu, true),
                    (Activation::GeluTanh, false),
                ] {
                    let case = format!("{act:?}, sub-norm {sub_norm}, {m}×{width}");
                    let g = sub_norm.then_some(&gain[..]);
                    let want = gate_quantize_on(&mut self.cpu, act, &x, &up, g, m, width);
                    let got = gate_quantize_on(&mut self.dev, act, &x, &up, g, m, width);
                    if let (Some(w), Some(gt)) =
                        (self.ok("gate_quantize", &case, want), self.ok("gate_quantize", &case, got))
                    {
                        self.quant_rows("gate_quantize", case, &gt, &w, true);
                    }
                }
            }
        }
    }

    fn bitlinear(&mut self) {
        let mut rng = Rng::new(5);
        let shapes = [(1, 1), (5, 17), (8, 256), (13, 300), (40, 640), (96, 2560), (33, 1000)];
        for (si, &(rows, cols)) in shapes.iter().enumerate() {
            let codes = rng.ints(rows * cols, -1, 1);
            let scale = if si % 2 == 0 { WeightScale::Multiply(0.37) } else { WeightScale::Divide(1.9) };
            let plain = TernaryMatrix::from_ternary(&codes, rows, cols, scale).expect("valid codes");
            let blocks = cols.div_ceil(256);
            let d: Vec<f32> = (0..rows * blocks).map(|_| 0.5 + rng.float(0.4)).collect();
            let scaled =
                TernaryMatrix::from_ternary_block_scaled(&codes, rows, cols, d, scale).expect("valid");
            for (kind, w) in [("one scale", plain), ("block scales", scaled)] {
                let case = format!("{rows}×{cols} {kind} {scale:?}");
                let (Some(cw), Some(dw)) = (
                    self.ok("upload_linear", &case, self.cpu.upload_linear(w.clone())),
                    self.ok("upload_linear", &case, self.dev.upload_linear(w)),
                ) else {
                    continue;
                };
                for m in batch_sizes(self.opts.max_batch) {
                    let q = rng.ints(m * cols, -128, 127);
                    let s_a: Vec<f32> = (0..m).map(|_| 0.5 + rng.float(0.45)).collect();
                    let case = format!("{case}, {m} tokens");
                    let want = bitlinear_on(&mut self.cpu, &cw, &q, &s_a, cols, rows);
                    let got = bitlinear_on(&mut self.dev, &dw, &q, &s_a, cols, rows);
                    if let (Some(w), Some(g)) =
                        (self.ok("bitlinear", &case, want), self.ok("bitlinear", &case, got))
                    {
                        self.exact("bitlinear", case, &g, &w);
                    }
                }
            }
        }
        // q, k, v (three outputs) and gate, up (two) from one input; rows wide enough for a
        // device to split K (1 100 columns) and not (300).
        for cols in [300, 1100] {
            let mats: Vec<TernaryMatrix> = [48, 16, 16]
                .iter()
                .map(|&r| {
                    TernaryMatrix::from_ternary(
                        &rng.ints(r * cols, -1, 1),
                        r,
                        cols,
                        WeightScale::Multiply(0.6),
                    )
                    .expect("valid")
                })
                .collect();
            let (mut cws, mut dws) = (Vec::new(), Vec::new());
            for w in &mats {
                let case = "bitlinear_many weights";
                if let (Some(c), Some(d)) = (
                    self.ok("upload_linear", case, self.cpu.upload_linear(w.clone())),
                    self.ok("upload_linear", case, self.dev.upload_linear(w.clone())),
                ) {
                    cws.push(c);
                    dws.push(d);
                }
            }
            if cws.len() != 3 {
                continue;
            }
            for m in batch_sizes(self.opts.max_batch) {
                let q = rng.ints(m * cols, -128, 127);
                let s_a: Vec<f32> = (0..m).map(|_| 0.5 + rng.float(0.45)).collect();
                let case = format!("[48, 16, 16]×{cols}, {m} tokens");
                let want = many_on(&mut self.cpu, [&cws[0], &cws[1], &cws[2]], &q, &s_a, cols, [48, 16, 16]);
                let got = many_on(&mut self.dev, [&dws[0], &dws[1], &dws[2]], &q, &s_a, cols, [48, 16, 16]);
                if let (Some(w), Some(g)) =
                    (self.ok("bitlinear_many", &case, want), self.ok("bitlinear_many", &case, got))
                {
                    self.exact("bitlinear_many", case, &g, &w);
                }
                let case = format!("[48, 16]×{cols}, {m} tokens");
                let want = many_on(&mut self.cpu, [&cws[0], &cws[1]], &q, &s_a, cols, [48, 16]);
                let got = many_on(&mut self.dev, [&dws[0], &dws[1]], &q, &s_a, cols, [48, 16]);
                if let (Some(w), Some(g)) =
                    (self.ok("bitlinear_many", &case, want), self.ok("bitlinear_many", &case, got))
                {
                    self.exact("bitlinear_many", case, &g, &w);
                }
            }
        }
    }

    fn int8_linear(&mut self) {
        let mut rng = Rng::new(6);
        for (rows, cols, bits) in [(7, 300, 8), (64, 2560, 8), (19, 513, 6), (1, 1, 8)] {
            let max = if bits == 8 { 127 } else { 31 };
            let q = rng.ints(rows * cols, -max, max);
            let scales: Vec<f32> = (0..rows).map(|_| 0.01 + rng.float(0.005)).collect();
            let w = if bits == 8 {
                Int8Matrix::from_int8(&q, &scales, rows, cols)
            } else {
                Int8Matrix::from_int6(&q, &scales, rows, cols)
            }
            .expect("valid weights");
            let case = format!("{rows}×{cols} int{bits}");
            let (Some(cw), Some(dw)) = (
                self.ok("upload_int8", &case, self.cpu.upload_int8(w.clone())),
                self.ok("upload_int8", &case, self.dev.upload_int8(w)),
            ) else {
                continue;
            };
            for m in batch_sizes(self.opts.max_batch) {
                let x = rng.ints(m * cols, -128, 127);
                let s_a: Vec<f32> = (0..m).map(|_| 0.5 + rng.float(0.45)).collect();
                let case = format!("{case}, {m} tokens");
                let want = int8_on(&mut self.cpu, &cw, &x, &s_a, cols, rows);
                let got = int8_on(&mut self.dev, &dw, &x, &s_a, cols, rows);
                if let (Some(w), Some(g)) =
                    (self.ok("int8_linear", &case, want), self.ok("int8_linear", &case, got))
                {
                    self.exact("int8_linear", case, &g, &w);
                }
            }
        }
    }

    fn rope(&mut self) {
        let mut rng = Rng::new(7);
        for (n_heads, head_dim, theta) in [(4, 32, 10_000.0), (5, 64, 500_000.0), (20, 128, 500_000.0)] {
            let inv_freq = bitnet_core::ops::rope_inv_freq(theta, head_dim);
            let width = n_heads * head_dim;
            for m in batch_sizes(self.opts.max_batch).into_iter().step_by(3) {
                let x = rng.floats(m * width, 3.0);
                // Positions of several sequences: small, large, repeated.
                let positions: Vec<u32> =
                    (0..m).map(|t| [t, 4095 - t, 7, 100_000 + t][t % 4] as u32).collect();
                let case = format!("{n_heads} heads of {head_dim}, {m} rows");
                let want = rope_on(&mut self.cpu, &x, &inv_freq, &positions, n_heads, head_dim);
                let got = rope_on(&mut self.dev, &x, &inv_freq, &positions, n_heads, head_dim);
                if let (Some(w), Some(g)) = (self.ok("rope", &case, want), self.ok("rope", &case, got)) {
                    self.close_rows("rope", case, &g, &w, width, ROW_RTOL);
                }
            }
        }
    }

    /// rope_kv_store fills a paged store on both backends from the same keys and values; each
    /// slot is read back, then attention runs over several segments' block tables.
    fn kv_and_attention(&mut self, kv_type: KvType) {
        let mut rng = Rng::new(8 + kv_type as u64);
        let max_batch = self.opts.max_batch;
        // (n_heads, n_kv_heads, head_dim): GQA ratios 1, 4, 3 and 2B-4T's 20/5 × 128.
        for (n_heads, n_kv, hd) in [(4, 4, 32), (8, 2, 64), (6, 2, 128), (20, 5, 128)] {
            let kv_dim = n_kv * hd;
            let shape_name = format!("{kv_type:?} KV, {n_heads}/{n_kv} heads of {hd}");
            // Segments (rows, pos0): decode steps, prefill chunks, contexts ending in, at and
            // past block boundaries, long contexts that a backend may split; at most max_batch
            // rows in all.
            let mut segs: Vec<(usize, usize)> = vec![
                (1, 0),
                (3, 5),
                (5, 0),
                (1, 31),
                (1, 64),
                (17, 31),
                (2, 100),
                (1, 300),
                (4, 200),
                (5, 40),
            ];
            while segs.iter().map(|s| s.0).sum::<usize>() > max_batch {
                segs.pop();
            }
            let blocks_of = |&(rows, pos0): &(usize, usize)| (pos0 + rows).div_ceil(BLOCK_TOKENS);
            let total_blocks: usize = segs.iter().map(blocks_of).sum::<usize>() + 3;
            // A shuffled block order shared by every sequence's table.
            let mut order: Vec<u32> = (0..total_blocks as u32).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            let mut tables = Vec::new();
            let mut segments = Vec::new();
            let (mut positions, mut slots) = (Vec::new(), Vec::new());
            let (mut next_block, mut first_row) = (0, 0);
            for &(rows, pos0) in &segs {
                let table = &order[next_block..next_block + blocks_of(&(rows, pos0))];
                next_block += table.len();
                segments.push(AttentionSegment { first_row, rows, pos0, table_start: tables.len() });
                for p in 0..pos0 + rows {
                    positions.push(p as u32);
                    slots.push(table[p / BLOCK_TOKENS] * BLOCK_TOKENS as u32 + (p % BLOCK_TOKENS) as u32);
                }
                tables.extend_from_slice(table);
                first_row += rows;
            }
            let n = positions.len();
            let k = rng.floats(n * kv_dim, 2.0);
            let v = rng.floats(n * kv_dim, 1.0);
            // Queries rotated in the same call (rope_qk_store).
            let prompt_q = rng.floats(n * n_heads * hd, 2.0);
            let inv_freq = bitnet_core::ops::rope_inv_freq(10_000.0, hd);
            let cpu_store = fill_store(
                &mut self.cpu,
                total_blocks,
                kv_dim,
                kv_type,
                &k,
                &v,
                &positions,
                &slots,
                &inv_freq,
                hd,
                max_batch,
                &prompt_q,
                n_heads,
            );
            let dev_store = fill_store(
                &mut self.dev,
                total_blocks,
                kv_dim,
                kv_type,
                &k,
                &v,
                &positions,
                &slots,
                &inv_freq,
                hd,
                max_batch,
                &prompt_q,
                n_heads,
            );
            let (Some((cs, want_q)), Some((ds, got_q))) = (
                self.ok("rope_qk_store", &shape_name, cpu_store),
                self.ok("rope_qk_store", &shape_name, dev_store),
            ) else {
                continue;
            };
            self.close_rows("rope_qk_store queries", shape_name.clone(), &got_q, &want_q, hd, ROW_RTOL);
            // Every written slot, and one never written (zero on both) in the other layer.
            let (mut want_k, mut want_v, mut got_k, mut got_v) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut read_ok = true;
            for (layer, slot) in slots.iter().map(|&s| (1, s as usize)).chain([(0, slots[0] as usize)]) {
                let c = read_slot(&mut self.cpu, &cs, layer, slot, kv_dim, &mut want_k, &mut want_v);
                let d = read_slot(&mut self.dev, &ds, layer, slot, kv_dim, &mut got_k, &mut got_v);
                read_ok &= self.ok("read_kv", &shape_name, c).is_some()
                    && self.ok("read_kv", &shape_name, d).is_some();
            }
            if read_ok {
                // A 16-bit key rounds a rotation a few ulps off to the neighbouring value at most.
                let key_tol = match kv_type {
                    KvType::F32 => ROW_RTOL,
                    KvType::Bf16 => 1.0 / 128.0,
                    KvType::F16 => 1.0 / 1024.0,
                };
                self.close_rows("rope_kv_store keys", shape_name.clone(), &got_k, &want_k, kv_dim, key_tol);
                self.exact("rope_kv_store values", shape_name.clone(), &got_v, &want_v);
            }
            let rows: usize = segs.iter().map(|s| s.0).sum();
            let q = rng.floats(rows * n_heads * hd, 2.0);
            // Whole-context attention, and Gemma3's: another scale and a sliding window shorter
            // than a block and than the longer segments.
            let causal = HeadShape::causal(n_heads, n_kv, hd);
            let sliding = HeadShape { scale: 24f32.powf(-0.5), window: Some(7), ..causal };
            for shape in [causal, sliding] {
                let case = format!("{shape_name}, window {:?}, segments {segs:?}", shape.window);
                let want = attention_on(&mut self.cpu, &cs, &q, &tables, &segments, shape);
                let got = attention_on(&mut self.dev, &ds, &q, &tables, &segments, shape);
                if let (Some(w), Some(g)) =
                    (self.ok("attention", &case, want), self.ok("attention", &case, got))
                {
                    let max = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    self.close("attention", case, &g, &w, |_| ATTENTION_RTOL * max);
                }
            }
        }
    }

    fn lm_head(&mut self) {
        let mut rng = Rng::new(9);
        for (vocab, hidden) in [(300, 96), (1001, 2560), (5, 7)] {
            let values = rng.floats(vocab * hidden, 0.1);
            for dtype in ["f32", "bf16", "f16"] {
                let w = dense(vocab, hidden, &values, dtype);
                let wide = w.to_f32();
                let case = format!("{dtype} {vocab}×{hidden}");
                let (Some(cw), Some(dw)) = (
                    self.ok("upload_dense", &case, self.cpu.upload_dense(w.clone())),
                    self.ok("upload_dense", &case, self.dev.upload_dense(w)),
                ) else {
                    continue;
                };
                for m in batch_sizes(self.opts.max_batch.min(32)).into_iter().step_by(2) {
                    let total = m + 2;
                    let x = rng.floats(total * hidden, 2.0);
                    let case = format!("{case}, rows 2..{total}");
                    let want = lm_head_on(&mut self.cpu, &cw, &x, 2, m, vocab);
                    let got = lm_head_on(&mut self.dev, &dw, &x, 2, m, vocab);
                    if let (Some(wt), Some(g)) =
                        (self.ok("lm_head", &case, want), self.ok("lm_head", &case, got))
                    {
                        let mag: Vec<f32> = (0..m * vocab)
                            .map(|i| {
                                let (t, r) = (2 + i / vocab, i % vocab);
                                let xr = &x[t * hidden..(t + 1) * hidden];
                                wide[r * hidden..(r + 1) * hidden]
                                    .iter()
                                    .zip(xr)
                                    .map(|(a, b)| (a * b).abs())
                                    .sum()
                            })
                            .collect();
                        self.close("lm_head", case, &g, &wt, |i| LM_HEAD_RTOL * mag[i] + f32::MIN_POSITIVE);
                    }
                }
            }
        }
    }

    /// Non-ternary matrices in their stored formats (F32/F16/BF16 and the GGUF block formats):
    /// `dense_linear` within [`LM_HEAD_RTOL`] of `Σ_c |w_c · x_c|` (the reference quantizes the
    /// activations of block formats the same way on every backend), `dense_embedding` exact.
    fn dense_linear(&mut self) {
        let mut rng = Rng::new(11);
        for format in DenseFormat::ALL {
            for (rows, cols) in [(37, 256), (300, 512), (5, 768)] {
                let values = rng.floats(rows * cols, 0.1);
                let case = format!("{} {rows}×{cols}", format.name());
                // Formats without a quantizer here (Q4_0, Q4_1, Q4_K) are read from files only.
                let Ok(w) = DenseLinear::encode(format, &values, rows, cols) else { break };
                let wide = w.to_f32();
                let dw = match self.dev.upload_dense_linear(w.clone()) {
                    Err(BackendError::Unsupported { .. }) => {
                        self.unsupported.push(format.name().to_string());
                        break;
                    }
                    r => self.ok("upload_dense_linear", &case, r),
                };
                let (Some(cw), Some(dw)) =
                    (self.ok("upload_dense_linear", &case, self.cpu.upload_dense_linear(w)), dw)
                else {
                    continue;
                };
                let ids: Vec<u32> = (0..7).map(|_| rng.below(rows) as u32).collect();
                let want = dense_embedding_on(&mut self.cpu, &cw, &ids, cols);
                let got = dense_embedding_on(&mut self.dev, &dw, &ids, cols);
                if let (Some(w), Some(g)) =
                    (self.ok("dense_embedding", &case, want), self.ok("dense_embedding", &case, got))
                {
                    self.exact("dense_embedding", case.clone(), &g, &w);
                }
                let max_batch = self.opts.max_batch;
                for m in [1, 2, 5, 16, 33].into_iter().filter(|&m| m <= max_batch) {
                    let total = m + 1;
                    let x = rng.floats(total * cols, 2.0);
                    let case = format!("{case}, rows 1..{total}");
                    let want = dense_linear_on(&mut self.cpu, &cw, &x, 1, m, rows, cols);
                    let got = dense_linear_on(&mut self.dev, &dw, &x, 1, m, rows, cols);
                    if let (Some(wt), Some(g)) =
                        (self.ok("dense_linear", &case, want), self.ok("dense_linear", &case, got))
                    {
                        let mag: Vec<f32> = (0..m * rows)
                            .map(|i| {
                                let (t, r) = (1 + i / rows, i % rows);
                                let xr = &x[t * cols..(t + 1) * cols];
                                wide[r * cols..(r + 1) * cols]
                                    .iter()
                                    .zip(xr)
                                    .map(|(a, b)| (a * b).abs())
                                    .sum()
                            })
                            .collect();
                        self.close("dense_linear", case, &g, &wt, |i| {
                            LM_HEAD_RTOL * mag[i] + f32::MIN_POSITIVE
                        });
                    }
                }
            }
        }
    }
}

fn dense_embedding_on<B: Backend>(
    b: &mut B,
    table: &B::DenseLinear,
    ids: &[u32],
    width: usize,
) -> Result<Vec<f32>, BackendError> {
    let mut out = b.buffer(ids.len() * width)?;
    b.dense_embedding(table, ids, &mut out);
    read_back(b, &out, ids.len() * width)
}

fn dense_linear_on<B: Backend>(
    b: &mut B,
    w: &B::DenseLinear,
    x: &[f32],
    first: usize,
    rows: usize,
    out_width: usize,
    width: usize,
) -> Result<Vec<f32>, BackendError> {
    let xb = buffer_with(b, x.len(), x)?;
    let mut input = b.dense_input(first + rows, width)?;
    let mut out = b.buffer(rows * out_width)?;
    b.dense_linear(w, &xb, first, rows, &mut input, &mut out);
    read_back(b, &out, rows * out_width)
}

/// Row `id` of a table as its dtype stores it, widened.
fn table_row(values: &[f32], width: usize, id: u32, dtype: &str, out: &mut [f32]) {
    let row = &values[id as usize * width..(id as usize + 1) * width];
    for (o, &x) in out[..width].iter_mut().zip(row) {
        *o = match dtype {
            "f32" => x,
            "bf16" => half::bf16::from_f32(x).to_f32(),
            _ => half::f16::from_f32(x).to_f32(),
        };
    }
}

fn embedding_on<B: Backend>(
    b: &mut B,
    table: &B::Dense,
    ids: &[u32],
    width: usize,
) -> Result<Vec<f32>, BackendError> {
    let mut out = b.buffer(ids.len() * width)?;
    b.embedding(table, ids, &mut out);
    read_back(b, &out, ids.len() * width)
}

fn rmsnorm_on<B: Backend>(
    b: &mut B,
    x: &[f32],
    gain: Option<&[f32]>,
    m: usize,
    width: usize,
) -> Result<Vec<f32>, BackendError> {
    let xb = buffer_with(b, x.len(), x)?;
    let g = gain.map(|g| b.upload_vector(g)).transpose()?;
    let mut out = b.buffer(x.len())?;
    b.rmsnorm(&xb, g.as_ref(), m, width, 1e-5, &mut out);
    read_back(b, &out, x.len())
}

fn gate_on<B: Backend>(b: &mut B, act: Activation, g: &[f32], u: &[f32]) -> Result<Vec<f32>, BackendError> {
    let (gb, ub) = (buffer_with(b, g.len(), g)?, buffer_with(b, u.len(), u)?);
    let mut out = b.buffer(g.len())?;
    b.gate(act, &gb, &ub, g.len(), &mut out);
    read_back(b, &out, g.len())
}

fn quantize_on<B: Backend>(
    b: &mut B,
    x: &[f32],
    first: usize,
    rows: usize,
    width: usize,
    capacity: usize,
) -> Result<(Vec<i8>, Vec<f32>), BackendError> {
    let xb = buffer_with(b, x.len(), x)?;
    let mut q = b.quant_buffer(capacity, width)?;
    b.quantize(&xb, first, rows, width, &mut q);
    read_quant_back(b, &q, rows, width)
}

fn norm_quantize_on<B: Backend>(
    b: &mut B,
    x: &[f32],
    gain: Option<&[f32]>,
    m: usize,
    width: usize,
) -> Result<(Vec<i8>, Vec<f32>), BackendError> {
    let xb = buffer_with(b, x.len(), x)?;
    let g = gain.map(|g| b.upload_vector(g)).transpose()?;
    let mut q = b.quant_buffer(m, width)?;
    b.norm_quantize(&xb, g.as_ref(), m, width, 1e-5, &mut q);
    read_quant_back(b, &q, m, width)
}

/// `x + y` as read back, and the quantized norm of it.
#[allow(clippy::type_complexity)]
fn add_norm_quantize_on<B: Backend>(
    b: &mut B,
    x: &[f32],
    y: &[f32],
    gain: Option<&[f32]>,
    m: usize,
    width: usize,
) -> Result<(Vec<f32>, (Vec<i8>, Vec<f32>)), BackendError> {
    let mut xb = buffer_with(b, x.len(), x)?;
    let yb = buffer_with(b, y.len(), y)?;
    let g = gain.map(|g| b.upload_vector(g)).transpose()?;
    let mut q = b.quant_buffer(m, width)?;
    b.add_norm_quantize(&mut xb, &yb, g.as_ref(), m, width, 1e-5, &mut q);
    let mut sum = vec![0.0; x.len()];
    b.read(&xb, 0, &mut sum)?;
    Ok((sum, read_quant_back(b, &q, m, width)?))
}

#[allow(clippy::too_many_arguments)]
fn gate_quantize_on<B: Backend>(
    b: &mut B,
    act: Activation,
    gate: &[f32],
    up: &[f32],
    sub_norm: Option<&[f32]>,
    m: usize,
    width: usize,
) -> Result<(Vec<i8>, Vec<f32>), BackendError> {
    let (gb, ub) = (buffer_with(b, gate.len(), gate)?, buffer_with(b, up.len(), up)?);
    let g = sub_norm.map(|g| b.upload_vector(g)).transpose()?;
    let mut q = b.quant_buffer(m, width)?;
    b.gate_quantize(act, &gb, &ub, g.as_ref(), m, width, 1e-5, &mut q);
    read_quant_back(b, &q, m, width)
}

fn bitlinear_on<B: Backend>(
    b: &mut B,
    w: &B::Linear,
    q: &[i8],
    s_a: &[f32],
    cols: usize,
    rows: usize,
) -> Result<Vec<f32>, BackendError> {
    let m = s_a.len();
    let mut x = b.quant_buffer(m, cols)?;
    b.write_quant(q, s_a, &mut x)?;
    let mut out = b.buffer(m * rows)?;
    b.bitlinear(w, &x, &mut out);
    read_back(b, &out, m * rows)
}

/// The outputs of `bitlinear_many`, one after another.
fn many_on<B: Backend, const N: usize>(
    b: &mut B,
    ws: [&B::Linear; N],
    q: &[i8],
    s_a: &[f32],
    cols: usize,
    rows: [usize; N],
) -> Result<Vec<f32>, BackendError> {
    let m = s_a.len();
    let mut x = b.quant_buffer(m, cols)?;
    b.write_quant(q, s_a, &mut x)?;
    let mut outs = Vec::with_capacity(N);
    for r in rows {
        outs.push(b.buffer(m * r)?);
    }
    {
        let mut it = outs.iter_mut();
        let refs: [&mut B::Buffer; N] = std::array::from_fn(|_| it.next().expect("N buffers"));
        b.bitlinear_many(ws, &x, refs);
    }
    let mut all = Vec::new();
    for (o, r) in outs.iter().zip(rows) {
        all.extend(read_back(b, o, m * r)?);
    }
    Ok(all)
}

fn int8_on<B: Backend>(
    b: &mut B,
    w: &B::Int8Linear,
    q: &[i8],
    s_a: &[f32],
    cols: usize,
    rows: usize,
) -> Result<Vec<f32>, BackendError> {
    let m = s_a.len();
    let mut x = b.quant_buffer(m, cols)?;
    b.write_quant(q, s_a, &mut x)?;
    let mut out = b.buffer(m * rows)?;
    b.int8_linear(w, &x, &mut out);
    read_back(b, &out, m * rows)
}

fn rope_on<B: Backend>(
    b: &mut B,
    x: &[f32],
    inv_freq: &[f32],
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
) -> Result<Vec<f32>, BackendError> {
    let mut xb = buffer_with(b, x.len(), x)?;
    let f = b.upload_vector(inv_freq)?;
    b.rope(&mut xb, &f, positions, n_heads, head_dim);
    read_back(b, &xb, x.len())
}

/// A two-layer store of `blocks` blocks with keys and values written into layer 1 through
/// `rope_qk_store` (every other call: `rope` and `rope_kv_store`), `max_batch` rows per call, and
/// the queries `q` rotated on the way.
#[allow(clippy::too_many_arguments)]
fn fill_store<B: Backend>(
    b: &mut B,
    blocks: usize,
    kv_dim: usize,
    kv_type: KvType,
    k: &[f32],
    v: &[f32],
    positions: &[u32],
    slots: &[u32],
    inv_freq: &[f32],
    head_dim: usize,
    max_batch: usize,
    q: &[f32],
    n_heads: usize,
) -> Result<(B::KvStore, Vec<f32>), BackendError> {
    let mut store = b.kv_store(2, blocks, kv_dim, kv_type)?;
    let f = b.upload_vector(inv_freq)?;
    let (mut kb, mut vb) = (b.buffer(max_batch * kv_dim)?, b.buffer(max_batch * kv_dim)?);
    let q_dim = n_heads * head_dim;
    let mut qb = b.buffer(max_batch * q_dim)?;
    let mut rotated = vec![0.0; q.len()];
    for start in (0..positions.len()).step_by(max_batch) {
        let end = (start + max_batch).min(positions.len());
        b.write(&mut kb, 0, &k[start * kv_dim..end * kv_dim])?;
        b.write(&mut vb, 0, &v[start * kv_dim..end * kv_dim])?;
        b.write(&mut qb, 0, &q[start * q_dim..end * q_dim])?;
        let (pos, slot) = (&positions[start..end], &slots[start..end]);
        // Every other call through the two separate operations, so that each is checked.
        if (start / max_batch).is_multiple_of(2) {
            b.rope_qk_store(&mut qb, n_heads, &mut store, 1, &kb, &vb, pos, slot, &f, head_dim);
        } else {
            b.rope(&mut qb, &f, pos, n_heads, head_dim);
            b.rope_kv_store(&mut store, 1, &kb, &vb, pos, slot, &f, head_dim);
        }
        b.read(&qb, 0, &mut rotated[start * q_dim..end * q_dim])?;
    }
    b.synchronize()?;
    Ok((store, rotated))
}

/// Appends the key and value in `slot` of `layer`, read back from `b`.
#[allow(clippy::too_many_arguments)]
fn read_slot<B: Backend>(
    b: &mut B,
    store: &B::KvStore,
    layer: usize,
    slot: usize,
    kv_dim: usize,
    keys: &mut Vec<f32>,
    values: &mut Vec<f32>,
) -> Result<(), BackendError> {
    let (mut k, mut v) = (vec![0.0; kv_dim], vec![0.0; kv_dim]);
    let r = b.read_kv(store, layer, slot, &mut k, &mut v);
    keys.extend(k);
    values.extend(v);
    r
}

fn attention_on<B: Backend>(
    b: &mut B,
    store: &B::KvStore,
    q: &[f32],
    tables: &[u32],
    segments: &[AttentionSegment],
    shape: HeadShape,
) -> Result<Vec<f32>, BackendError> {
    let qb = buffer_with(b, q.len(), q)?;
    let mut out = b.buffer(q.len())?;
    b.attention(&qb, store, 1, tables, segments, shape, &mut out);
    read_back(b, &out, q.len())
}

fn lm_head_on<B: Backend>(
    b: &mut B,
    w: &B::Dense,
    x: &[f32],
    first: usize,
    rows: usize,
    vocab: usize,
) -> Result<Vec<f32>, BackendError> {
    let xb = buffer_with(b, x.len(), x)?;
    let mut out = b.buffer(rows * vocab)?;
    b.lm_head(w, &xb, first, rows, &mut out);
    read_back(b, &out, rows * vocab)
}
