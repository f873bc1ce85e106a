//! Kernel micro-benchmarks on the shapes of BitNet b1.58 2B-4T (hidden 2560, intermediate
//! 6912, 640-wide k/v, vocabulary 128256), for every kernel path this CPU has.
//!
//! `cargo bench -p bitnet-quant --bench kernels` (add a filter such as `gemv` to run a part).
//! GEMVs count weight bytes (so divan prints GB/s of weights); GEMMs count multiply-adds.
//! `layer_sweep` runs the seven GEMVs of four layers (70 MB of weights, more than the L3) to
//! measure the rate from DRAM rather than from cache.

use std::fmt;
use std::sync::OnceLock;

use bitnet_quant::selftest::Rng;
use bitnet_quant::{Int8Matrix, KernelPath, QuantizedActivations, TernaryMatrix, WeightScale};
use divan::counter::{BytesCount, ItemsCount};
use divan::Bencher;

fn main() {
    eprintln!(
        "kernel paths: {}; rayon threads: {}; loadavg: {}",
        KernelPath::available().iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
        rayon::current_num_threads(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    divan::main();
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Shape {
    name: &'static str,
    rows: usize,
    cols: usize,
}

/// The BitLinear shapes of one 2B-4T layer, as `[out_features, in_features]`.
const SHAPES: [Shape; 4] = [
    Shape { name: "q_o", rows: 2560, cols: 2560 },
    Shape { name: "k_v", rows: 640, cols: 2560 },
    Shape { name: "gate_up", rows: 6912, cols: 2560 },
    Shape { name: "down", rows: 2560, cols: 6912 },
];
/// The BitLinear shapes of the `small` training preset (hidden 256, intermediate 1024): short
/// rows, where a GEMM's per-output work (reductions, stores) weighs most.
const TRAIN_SHAPES: [Shape; 3] = [
    Shape { name: "train_qkv", rows: 512, cols: 256 },
    Shape { name: "train_gate_up", rows: 2048, cols: 256 },
    Shape { name: "train_down", rows: 256, cols: 1024 },
];
const LM_HEAD: Shape = Shape { name: "lm_head", rows: 128256, cols: 2560 };

#[derive(Clone, Copy)]
struct Case {
    path: KernelPath,
    shape: Shape,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}x{}", self.path, self.shape.name, self.shape.rows, self.shape.cols)
    }
}

fn cases(shapes: &[Shape], with_scalar: bool) -> Vec<Case> {
    let paths = KernelPath::available().into_iter().filter(|&p| with_scalar || p != KernelPath::Scalar);
    paths.flat_map(|path| shapes.iter().map(move |&shape| Case { path, shape })).collect()
}

fn random_ternary(rows: usize, cols: usize, seed: u64) -> TernaryMatrix {
    let mut rng = Rng::new(seed);
    let codes: Vec<i8> = (0..rows * cols).map(|_| rng.range(-1, 1) as i8).collect();
    TernaryMatrix::from_ternary(&codes, rows, cols, WeightScale::Multiply(0.5)).unwrap()
}

/// One packed matrix per shape, built on first use.
fn ternary(shape: Shape) -> &'static TernaryMatrix {
    static CACHE: [OnceLock<TernaryMatrix>; 7] = [const { OnceLock::new() }; 7];
    let i = SHAPES.iter().chain(&TRAIN_SHAPES).position(|s| *s == shape).unwrap();
    CACHE[i].get_or_init(|| random_ternary(shape.rows, shape.cols, i as u64))
}

fn lm_head() -> &'static Int8Matrix {
    static CACHE: OnceLock<Int8Matrix> = OnceLock::new();
    CACHE.get_or_init(|| {
        let (rows, cols) = (LM_HEAD.rows, LM_HEAD.cols);
        let mut rng = Rng::new(42);
        let q: Vec<i8> = (0..rows * cols).map(|_| rng.range(-127, 127) as i8).collect();
        Int8Matrix::from_int8(&q, &vec![0.01; rows], rows, cols).unwrap()
    })
}

/// The head in 6 bits.
fn lm_head_int6() -> &'static Int8Matrix {
    static CACHE: OnceLock<Int8Matrix> = OnceLock::new();
    CACHE.get_or_init(|| {
        let (rows, cols) = (LM_HEAD.rows, LM_HEAD.cols);
        let mut rng = Rng::new(43);
        let q: Vec<i8> = (0..rows * cols).map(|_| rng.range(-31, 31) as i8).collect();
        Int8Matrix::from_int6(&q, &vec![0.01; rows], rows, cols).unwrap()
    })
}

fn activations(m: usize, k: usize) -> QuantizedActivations {
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.01).collect();
    let mut q = QuantizedActivations::new(m, k);
    q.quantize(&x, m);
    q
}

#[divan::bench(args = cases(&SHAPES, true), max_time = 2)]
fn ternary_gemv(bencher: Bencher, case: Case) {
    let w = ternary(case.shape);
    let x = activations(1, case.shape.cols);
    let mut out = vec![0f32; case.shape.rows];
    bencher.counter(BytesCount::new(w.bytes())).bench_local(|| w.forward_with(case.path, &x, &mut out));
}

fn gemm(bencher: Bencher, case: Case, m: usize) {
    let w = ternary(case.shape);
    let x = activations(m, case.shape.cols);
    let mut out = vec![0f32; m * case.shape.rows];
    let macs = m * case.shape.rows * case.shape.cols;
    bencher.counter(ItemsCount::new(macs)).bench_local(|| w.forward_with(case.path, &x, &mut out));
}

/// A decode step of 16 sequences (the serving scheduler's batch).
#[divan::bench(args = cases(&SHAPES, false), max_time = 3, sample_count = 20)]
fn ternary_gemm_m16(bencher: Bencher, case: Case) {
    gemm(bencher, case, 16)
}

#[divan::bench(args = cases(&SHAPES, false), max_time = 3, sample_count = 20)]
fn ternary_gemm_m128(bencher: Bencher, case: Case) {
    gemm(bencher, case, 128)
}

#[divan::bench(args = cases(&SHAPES, false), max_time = 4, sample_count = 10)]
fn ternary_gemm_m512(bencher: Bencher, case: Case) {
    gemm(bencher, case, 512)
}

#[divan::bench(args = cases(&TRAIN_SHAPES, false), max_time = 3, sample_count = 20)]
fn ternary_gemm_train_m1024(bencher: Bencher, case: Case) {
    gemm(bencher, case, 1024)
}

/// The integer sums alone, as the training forward takes them.
#[divan::bench(args = cases(&TRAIN_SHAPES, false), max_time = 3, sample_count = 20)]
fn ternary_gemm_i32_train_m1024(bencher: Bencher, case: Case) {
    let (w, m) = (ternary(case.shape), 1024);
    let x = activations(m, case.shape.cols);
    let mut out = vec![0i32; m * case.shape.rows];
    let macs = m * case.shape.rows * case.shape.cols;
    bencher.counter(ItemsCount::new(macs)).bench_local(|| w.matmul_i32_with(case.path, &x, &mut out));
}

/// The mixed-precision training backward's products on the `small` preset's gate/up shapes
/// (1024 tokens): `dX = dY · W` (m = tokens, k = 1600, n = 256) and `dW = gᵀ · X`
/// (m = 1600, k = tokens, n = 256).
#[divan::bench(args = [("dx", 1024, 1600, 256), ("dw", 1600, 1024, 256)], max_time = 3, sample_count = 20)]
fn gemm_i16_i8_train(bencher: Bencher, (_name, m, k, n): (&str, usize, usize, usize)) {
    use bitnet_quant::int16::{gemm_i16_i8, ALayout, I16Rows, PackedPairs, ScaledOut};
    let mut rng = Rng::new(3);
    let a: Vec<i16> = (0..m * k).map(|_| rng.range(-32767, 32767) as i16).collect();
    let b: Vec<i8> = (0..k * n).map(|_| rng.range(-127, 127) as i8).collect();
    let packed = PackedPairs::from_i8(&b, k, n).unwrap();
    let scale = vec![1e-6f32; m];
    let mut out = vec![0f32; m * n];
    bencher.counter(ItemsCount::new(m * k * n)).bench_local(|| {
        let out = ScaledOut { out: &mut out, ldo: n, row_scale: &scale, accumulate: false };
        gemm_i16_i8(I16Rows { data: &a, m, layout: ALayout::RowMajor { lda: k } }, &packed, out).unwrap()
    });
}

#[divan::bench(args = cases(&[LM_HEAD], false), max_time = 3)]
fn int8_lm_head_gemv(bencher: Bencher, case: Case) {
    let w = lm_head();
    let x = activations(1, LM_HEAD.cols);
    let mut out = vec![0f32; LM_HEAD.rows];
    bencher.counter(BytesCount::new(w.bytes())).bench_local(|| w.forward_with(case.path, &x, &mut out));
}

#[divan::bench(args = cases(&[LM_HEAD], false), max_time = 3)]
fn int6_lm_head_gemv(bencher: Bencher, case: Case) {
    let w = lm_head_int6();
    let x = activations(1, LM_HEAD.cols);
    let mut out = vec![0f32; LM_HEAD.rows];
    bencher.counter(BytesCount::new(w.bytes())).bench_local(|| w.forward_with(case.path, &x, &mut out));
}

/// The integer head of a decode step of 16 sequences.
#[divan::bench(args = cases(&[LM_HEAD], false), max_time = 5, sample_count = 5)]
fn int8_lm_head_gemm_m16(bencher: Bencher, case: Case) {
    int8_head_gemm(bencher, case, 16)
}

#[divan::bench(args = cases(&[LM_HEAD], false), max_time = 5, sample_count = 3)]
fn int8_lm_head_gemm_m128(bencher: Bencher, case: Case) {
    int8_head_gemm(bencher, case, 128)
}

fn int8_head_gemm(bencher: Bencher, case: Case, m: usize) {
    let w = lm_head();
    let x = activations(m, LM_HEAD.cols);
    let mut out = vec![0f32; m * LM_HEAD.rows];
    bencher
        .counter(ItemsCount::new(m * LM_HEAD.rows * LM_HEAD.cols))
        .bench_local(|| w.forward_with(case.path, &x, &mut out));
}

/// The seven GEMVs of four 2B-4T layers in a row: 70 MB of weights, streamed from DRAM.
#[divan::bench(args = cases(&SHAPES[..1], false), max_time = 3)]
fn layer_sweep(bencher: Bencher, case: Case) {
    static LAYERS: OnceLock<Vec<TernaryMatrix>> = OnceLock::new();
    let layer = [SHAPES[0], SHAPES[1], SHAPES[1], SHAPES[0], SHAPES[2], SHAPES[2], SHAPES[3]];
    let mats = LAYERS.get_or_init(|| {
        (0..4)
            .flat_map(|l| layer.iter().enumerate().map(move |(i, s)| (l * 7 + i, s)))
            .map(|(seed, s)| random_ternary(s.rows, s.cols, 100 + seed as u64))
            .collect()
    });
    let x2560 = activations(1, 2560);
    let x6912 = activations(1, 6912);
    let mut out = vec![0f32; 6912];
    let bytes: usize = mats.iter().map(|m| m.bytes()).sum();
    bencher.counter(BytesCount::new(bytes)).bench_local(|| {
        for w in mats {
            let x = if w.cols() == 2560 { &x2560 } else { &x6912 };
            w.forward_with(case.path, x, &mut out[..w.rows()]);
        }
    });
}

/// [`layer_sweep`] with one scale per group of `G` columns (Q2_0: 64; Q1_0, PQ2_0, PTQ1_0: 128;
/// TQ1_0/TQ2_0: 256; 0 is the per-tensor scale) on the best path, counting weights: the cost of
/// group scales when decoding.
#[divan::bench(args = [0, 64, 128, 256], max_time = 3)]
fn layer_sweep_grouped(bencher: Bencher, group: usize) {
    grouped_sweep(bencher, group, 1)
}

/// [`layer_sweep_grouped`] for a 64-token prompt chunk (the panel GEMM; counting multiply-adds).
#[divan::bench(args = [0, 64, 128, 256], max_time = 3)]
fn layer_sweep_grouped_m64(bencher: Bencher, group: usize) {
    grouped_sweep(bencher, group, 64)
}

fn grouped_sweep(bencher: Bencher, group: usize, m: usize) {
    static LAYERS: [OnceLock<Vec<TernaryMatrix>>; 4] = [const { OnceLock::new() }; 4];
    let layer = [SHAPES[0], SHAPES[1], SHAPES[1], SHAPES[0], SHAPES[2], SHAPES[2], SHAPES[3]];
    let mats = LAYERS[[0, 64, 128, 256].iter().position(|&g| g == group).unwrap()].get_or_init(|| {
        (0..4)
            .flat_map(|l| layer.iter().enumerate().map(move |(i, s)| (l * 7 + i, s)))
            .map(|(seed, s)| {
                let w = random_ternary(s.rows, s.cols, 100 + seed as u64);
                if group == 0 {
                    return w;
                }
                let mut rng = Rng::new(seed as u64);
                let d: Vec<f32> =
                    (0..s.rows * s.cols / group).map(|_| 0.01 + rng.range(0, 100) as f32 * 1e-4).collect();
                TernaryMatrix::from_ternary_group_scaled(
                    &w.to_ternary(),
                    s.rows,
                    s.cols,
                    group,
                    &d,
                    w.scale(),
                )
                .unwrap()
            })
            .collect()
    });
    let x2560 = activations(m, 2560);
    let x6912 = activations(m, 6912);
    let mut out = vec![0f32; m * 6912];
    let weights: usize = mats.iter().map(|w| w.rows() * w.cols()).sum();
    bencher.counter(ItemsCount::new(m * weights)).bench_local(|| {
        for w in mats {
            let x = if w.cols() == 2560 { &x2560 } else { &x6912 };
            w.forward(x, &mut out[..m * w.rows()]);
        }
    });
}

#[divan::bench(args = [(1, 2560), (1, 6912), (128, 2560)], max_time = 1)]
fn quantize_activations(bencher: Bencher, (m, k): (usize, usize)) {
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.01).collect();
    let mut q = QuantizedActivations::new(m, k);
    bencher.counter(BytesCount::new(m * k * 4)).bench_local(|| q.quantize(&x, m));
}
