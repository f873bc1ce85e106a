//! Ternary matrices whose 256-column blocks carry their own scales (TQ1_0/TQ2_0 as llama.cpp
//! writes them): exact i32 partials on every kernel path, and outputs equal to the dense float
//! product of the dequantized weights with the same int8 activations.

use bitnet_quant::formats::{self, GgmlType};
use bitnet_quant::{KernelPath, QuantizedActivations, TernaryMatrix, WeightScale};

/// A small deterministic generator (xorshift64*).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn code(&mut self) -> i8 {
        (self.next() % 3) as i8 - 1
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// A hand-built TQ2_0 tensor `[rows, cols]` with a different scale in (nearly) every block:
/// its codes, its per-block scales as the file holds them (f16) and its dequantized values.
fn tq2_tensor(rows: usize, cols: usize, seed: u64) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    let mut rng = Lcg(seed);
    let codes: Vec<i8> = (0..rows * cols).map(|_| rng.code()).collect();
    let blocks = rows * cols / 256;
    let scales: Vec<f32> =
        (0..blocks).map(|b| 0.003 * (1 + b % 11) as f32 + 0.0001 * (b % 3) as f32).collect();
    let bytes = formats::tq2_0::pack(&codes, &scales).unwrap();
    let t = formats::ternary_codes(GgmlType::TQ2_0, &bytes, rows * cols).unwrap();
    assert_eq!(t.codes, codes);
    assert_eq!(t.block_len, 256);
    let distinct: std::collections::BTreeSet<u32> = t.scales.iter().map(|s| s.to_bits()).collect();
    assert!(distinct.len() > 1 || blocks == 1);
    let dense = formats::dequantize(GgmlType::TQ2_0, &bytes, rows * cols).unwrap();
    (t.codes, t.scales, dense)
}

fn activations(m: usize, k: usize, seed: u64) -> QuantizedActivations {
    let mut rng = Lcg(seed);
    let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 3.0).collect();
    let mut q = QuantizedActivations::new(m, k);
    q.quantize(&x, m);
    q
}

fn check(rows: usize, cols: usize, m: usize, scale: WeightScale, seed: u64) {
    let (codes, scales, dense) = tq2_tensor(rows, cols, seed);
    let blocks = cols / 256;
    let w = TernaryMatrix::from_ternary_block_scaled(&codes, rows, cols, scales.clone(), scale).unwrap();
    assert_eq!(w.block_scales(), Some(&scales[..]));
    let x = activations(m, cols, seed ^ 0x55);
    let mut first: Option<Vec<f32>> = None;
    for path in KernelPath::available() {
        // Exact i32 partials against the row-major reference.
        let mut parts = vec![0i32; m * rows * blocks];
        w.matmul_block_i32_with(path, &x, &mut parts);
        for t in 0..m {
            let xt = x.row(t);
            for r in 0..rows {
                for b in 0..blocks {
                    let want: i32 =
                        (b * 256..(b + 1) * 256).map(|c| codes[r * cols + c] as i32 * xt[c] as i32).sum();
                    assert_eq!(parts[(t * rows + r) * blocks + b], want, "{path} t{t} r{r} b{b}");
                }
            }
        }
        // Float outputs against the dense product of the dequantized weights.
        let mut got = vec![0.0f32; m * rows];
        w.forward_with(path, &x, &mut got);
        for t in 0..m {
            let (xt, s_a) = (x.row(t), x.scale(t) as f64);
            for r in 0..rows {
                let row = &dense[r * cols..(r + 1) * cols];
                let exact: f64 = row.iter().zip(xt).map(|(&w, &q)| w as f64 * q as f64).sum::<f64>();
                let mag: f64 = row.iter().zip(xt).map(|(&w, &q)| (w as f64 * q as f64).abs()).sum::<f64>();
                let (want, bound) = match scale {
                    WeightScale::Multiply(s) => (exact / s_a * s as f64, mag / s_a * s as f64),
                    WeightScale::Divide(d) => (exact / (s_a * d as f64), mag / (s_a * d as f64)),
                };
                let g = got[t * rows + r] as f64;
                assert!(
                    (g - want).abs() <= 1e-6 * want.abs().max(bound) + 1e-30,
                    "{path} t{t} r{r}: {g} vs dense {want}"
                );
            }
        }
        // Every path gives the same bits (same partials, same combination order).
        match &first {
            None => first = Some(got),
            Some(f) => assert!(f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{path}"),
        }
    }
}

#[test]
fn block_scales_gemv_and_gemm_match_dense() {
    for (rows, cols, m, seed) in
        [(13, 768, 1, 1), (13, 768, 5, 2), (24, 256, 9, 3), (8, 1024, 3, 4), (1, 512, 2, 5)]
    {
        check(rows, cols, m, WeightScale::Multiply(1.0), seed);
    }
    check(17, 512, 4, WeightScale::Multiply(0.75), 6);
    check(9, 512, 2, WeightScale::Divide(4.0), 7);
}

#[test]
fn equal_block_scales_agree_with_the_one_scale_kernels() {
    let (rows, cols, m) = (19, 768, 6);
    let mut rng = Lcg(11);
    let codes: Vec<i8> = (0..rows * cols).map(|_| rng.code()).collect();
    let a = 0.0421f32;
    let one = TernaryMatrix::from_ternary(&codes, rows, cols, WeightScale::Multiply(a)).unwrap();
    let blocked = TernaryMatrix::from_ternary_block_scaled(
        &codes,
        rows,
        cols,
        vec![a; rows * 3],
        WeightScale::Multiply(1.0),
    )
    .unwrap();
    let x = activations(m, cols, 12);
    let (mut y1, mut y2) = (vec![0.0; m * rows], vec![0.0; m * rows]);
    one.forward(&x, &mut y1);
    blocked.forward(&x, &mut y2);
    let mut parts = vec![0i32; m * rows * 3];
    blocked.matmul_block_i32_with(KernelPath::active(), &x, &mut parts);
    for (i, (p, q)) in y1.iter().zip(&y2).enumerate() {
        // Both round differently (one product vs three), within float noise of the terms.
        let mag: f32 =
            parts[i * 3..i * 3 + 3].iter().map(|&v| (a * v as f32).abs()).sum::<f32>() / x.scale(i / rows);
        assert!((p - q).abs() <= 1e-6 * mag, "{p} vs {q}");
    }
    assert_eq!(blocked.to_ternary(), codes);
}

#[test]
fn block_scale_count_is_checked() {
    let codes = vec![0i8; 4 * 300];
    // 300 columns: 2 blocks per row, so 8 scales.
    assert!(TernaryMatrix::from_ternary_block_scaled(
        &codes,
        4,
        300,
        vec![1.0; 8],
        WeightScale::Multiply(1.0)
    )
    .is_ok());
    let err =
        TernaryMatrix::from_ternary_block_scaled(&codes, 4, 300, vec![1.0; 4], WeightScale::Multiply(1.0))
            .unwrap_err();
    assert!(err.to_string().contains("block scales"), "{err}");
}
