//! Dense (non-ternary) GEMVs in their stored formats, on decode shapes: SmolLM2-135M's
//! projections and head (hidden 576, intermediate 1536, vocabulary 49152) and a 7B-class
//! 4096 × 4096 projection, on the scalar reference and the best path this CPU has.
//!
//! `cargo bench -p bitnet-quant --bench dense` (add a filter such as `q4_1` to run a part).
//! Each GEMV counts the weight bytes it streams, so divan prints GB/s of weights; the
//! activation quantization is included (it is part of every decode step).

use std::fmt;

use bitnet_quant::dense::{DenseActivations, DenseFormat, DenseLinear, Q4Lanes, Q6Lanes, Q8Lanes};
use bitnet_quant::selftest::Rng;
use bitnet_quant::KernelPath;
use divan::counter::BytesCount;
use divan::Bencher;

fn main() {
    eprintln!(
        "kernel paths: {}; rayon threads: {}",
        KernelPath::available().iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
        rayon::current_num_threads()
    );
    divan::main();
}

#[derive(Clone, Copy, Debug)]
struct Case {
    path: KernelPath,
    format: DenseFormat,
    name: &'static str,
    rows: usize,
    cols: usize,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}x{}", self.path, self.format, self.name, self.rows, self.cols)
    }
}

const SHAPES: [(&str, usize, usize); 4] =
    [("smol_q_o", 576, 576), ("smol_gate_up", 1536, 576), ("smol_down", 576, 1536), ("7b_q", 4096, 4096)];

fn cases() -> Vec<Case> {
    let paths = [KernelPath::Scalar, KernelPath::best()];
    let mut out = Vec::new();
    for path in paths.into_iter().take(if KernelPath::best() == KernelPath::Scalar { 1 } else { 2 }) {
        for format in DenseFormat::ALL {
            // K-quants need rows of whole 256-blocks (llama.cpp stores SmolLM2's 576 otherwise).
            for (name, rows, cols) in SHAPES.into_iter().filter(|s| s.2 % format.block() == 0) {
                out.push(Case { path, format, name, rows, cols });
            }
        }
    }
    out
}

/// SmolLM2's head in its stored Q8_0, and a Llama-2-7B head in Q6_K (what llama.cpp's Q4_K_M
/// files store it in).
fn head_cases() -> Vec<Case> {
    let path = KernelPath::best();
    vec![
        Case { path, format: DenseFormat::Q8_0, name: "smol_head", rows: 49152, cols: 576 },
        Case { path, format: DenseFormat::Q6_K, name: "7b_head", rows: 32000, cols: 4096 },
        // BitNet b1.58 2B-4T's tied table stored as Q8_0, and a slice of it that stays in cache.
        Case { path, format: DenseFormat::Q8_0, name: "2b4t_head", rows: 128256, cols: 2560 },
        Case { path, format: DenseFormat::Q8_0, name: "2b4t_head_cached", rows: 2048, cols: 2560 },
        Case { path, format: DenseFormat::Q6_K, name: "2b4t_head", rows: 128256, cols: 2560 },
        Case { path, format: DenseFormat::Q4_K, name: "2b4t_head", rows: 128256, cols: 2560 },
    ]
}

/// The head cases (Q8_0, Q6_K) on the best path, and on AVX2 where that is another x86 path.
fn lanes_cases() -> Vec<Case> {
    let q8: Vec<Case> = head_cases();
    let mut out = q8.clone();
    if KernelPath::Avx2.is_available() && KernelPath::best() != KernelPath::Avx2 {
        out.extend(q8.into_iter().map(|c| Case { path: KernelPath::Avx2, ..c }));
    }
    out
}

/// A matrix of random stored bytes with sane f16 scales (their values do not change the speed).
fn matrix(c: &Case) -> DenseLinear {
    let mut rng = Rng::new(c.rows as u64 * 31 + c.cols as u64);
    let n = c.rows * c.cols / c.format.block() * c.format.block_bytes();
    let mut bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
    // Keep the float formats' values and the block scales finite.
    let scale = 0x2000u16.to_le_bytes(); // f16 2^-7
    match c.format {
        DenseFormat::F32 => bytes.chunks_exact_mut(4).for_each(|b| b.copy_from_slice(&0.01f32.to_le_bytes())),
        DenseFormat::F16 | DenseFormat::BF16 => {
            bytes.chunks_exact_mut(2).for_each(|b| b.copy_from_slice(&scale))
        }
        DenseFormat::Q6_K => bytes.chunks_exact_mut(210).for_each(|b| b[208..].copy_from_slice(&scale)),
        // Q8_0 codes within ±127, as quantizers write them (a -128 takes the AVX2 kernel's
        // slower form).
        DenseFormat::Q8_0 => bytes.chunks_exact_mut(34).for_each(|b| {
            b[..2].copy_from_slice(&scale);
            b[2..].iter_mut().filter(|q| **q == 0x80).for_each(|q| *q = 0x81);
        }),
        _ => {
            let (bb, scales) = (c.format.block_bytes(), if c.format == DenseFormat::Q4_0 { 1 } else { 2 });
            bytes
                .chunks_exact_mut(bb)
                .for_each(|b| (0..scales).for_each(|i| b[2 * i..2 * i + 2].copy_from_slice(&scale)));
        }
    }
    DenseLinear::from_bytes(c.format.ggml(), c.rows, c.cols, &bytes).unwrap()
}

fn gemv(bencher: Bencher, case: Case) {
    let w = matrix(&case);
    let x: Vec<f32> = (0..case.cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.01).collect();
    let mut a = DenseActivations::new();
    let mut out = vec![0f32; case.rows];
    bencher.counter(BytesCount::new(w.bytes())).bench_local(|| {
        a.quantize(w.activation_kind(), &x, 1, case.cols).unwrap();
        w.forward_quantized_with(case.path, &a, &mut out).unwrap()
    });
}

#[divan::bench(args = cases(), max_time = 1)]
fn dense_gemv(bencher: Bencher, case: Case) {
    gemv(bencher, case)
}

#[divan::bench(args = head_cases(), max_time = 2)]
fn dense_head_gemv(bencher: Bencher, case: Case) {
    gemv(bencher, case)
}

/// The heads again, rows-in-lanes ([`Q8Lanes`], [`Q6Lanes`]: what the CPU backend runs them as
/// on x86).
/// (On x86 also on the AVX2 kernel of that layout.)
#[divan::bench(args = lanes_cases(), max_time = 2)]
fn dense_head_gemv_lanes(bencher: Bencher, case: Case) {
    let stored = matrix(&case);
    let x: Vec<f32> = (0..case.cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.01).collect();
    let mut a = DenseActivations::new();
    let mut out = vec![0f32; case.rows];
    let kind = stored.activation_kind();
    macro_rules! bench_lanes {
        ($lanes:ty) => {{
            let w = <$lanes>::from_stored(&stored).unwrap();
            bencher.counter(BytesCount::new(w.bytes())).bench_local(|| {
                a.quantize(kind, &x, 1, case.cols).unwrap();
                w.forward_quantized_with(case.path, &a, &mut out).unwrap()
            });
        }};
    }
    match case.format {
        DenseFormat::Q8_0 => bench_lanes!(Q8Lanes),
        DenseFormat::Q6_K => bench_lanes!(Q6Lanes),
        _ => bench_lanes!(Q4Lanes),
    }
}

/// Prefill: 64 tokens through SmolLM2's gate/up shape (multiply-adds per second).
#[divan::bench(args = [DenseFormat::Q4_1, DenseFormat::Q8_0, DenseFormat::F16], max_time = 2)]
fn dense_gemm_m64(bencher: Bencher, format: DenseFormat) {
    let case = Case { path: KernelPath::best(), format, name: "smol_gate_up", rows: 1536, cols: 576 };
    let w = matrix(&case);
    let m = 64;
    let x: Vec<f32> = (0..m * case.cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.01).collect();
    let mut a = DenseActivations::new();
    let mut out = vec![0f32; m * case.rows];
    bencher.counter(divan::counter::ItemsCount::new(m * case.rows * case.cols)).bench_local(|| {
        a.quantize(w.activation_kind(), &x, m, case.cols).unwrap();
        w.forward_quantized(&a, &mut out).unwrap()
    });
}
