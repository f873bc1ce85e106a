//! Ternary matrices whose groups of 32, 64, 128 or 256 columns carry their own scales (TQ1_0,
//! TQ2_0, Q1_0, Q2_0, PQ2_0, PTQ1_0 as llama.cpp and PrismML write them): exact i32 partials
//! per group on every kernel path, outputs equal to the dense float product of the dequantized
//! weights with the same int8 activations, and the same bits on every path.

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

/// A tensor `[rows, cols]` of `format` with a different scale in (nearly) every block: its
/// codes, its per-block scales as the file holds them (f16) and its dequantized values.
fn tensor(format: GgmlType, rows: usize, cols: usize, seed: u64) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    let mut rng = Lcg(seed);
    let block = format.ternary_group().unwrap();
    let codes: Vec<i8> = (0..rows * cols)
        .map(|_| match format {
            // Q1_0 has no zero.
            GgmlType::Q1_0 => (rng.next() % 2) as i8 * 2 - 1,
            _ => rng.code(),
        })
        .collect();
    let blocks = rows * cols / block;
    let scales: Vec<f32> =
        (0..blocks).map(|b| 0.003 * (1 + b % 11) as f32 + 0.0001 * (b % 3) as f32).collect();
    let bytes = formats::pack_ternary(format, &codes, &scales).unwrap();
    let t = formats::ternary_codes(format, &bytes, rows * cols).unwrap();
    assert_eq!(t.codes, codes, "{format}");
    assert_eq!(t.block_len, block);
    let distinct: std::collections::BTreeSet<u32> = t.scales.iter().map(|s| s.to_bits()).collect();
    assert!(distinct.len() > 1 || blocks == 1);
    let dense = formats::dequantize(format, &bytes, rows * cols).unwrap();
    (t.codes, t.scales, dense)
}

fn activations(m: usize, k: usize, seed: u64) -> QuantizedActivations {
    let mut rng = Lcg(seed);
    let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 3.0).collect();
    let mut q = QuantizedActivations::new(m, k);
    q.quantize(&x, m);
    q
}

/// Checks a group-scaled `[rows, cols]` matrix against `m` tokens on every path: partials,
/// dense agreement, equal bits.
fn check_matrix(
    codes: &[i8],
    scales: &[f32],
    group: usize,
    (rows, cols, m): (usize, usize, usize),
    scale: WeightScale,
    seed: u64,
) {
    let groups = cols.div_ceil(group);
    let dense: Vec<f32> =
        (0..rows * cols).map(|i| codes[i] as f32 * scales[i / cols * groups + i % cols / group]).collect();
    let w = TernaryMatrix::from_ternary_group_scaled(codes, rows, cols, group, scales, scale).unwrap();
    let d = w.group_scales().unwrap();
    assert_eq!((d.group(), d.groups_per_row()), (group, groups));
    assert_eq!(d.to_row_major(), scales);
    let x = activations(m, cols, seed ^ 0x55);
    let padded = cols.div_ceil(256) * 256 / group;
    let mut first: Option<Vec<f32>> = None;
    for path in KernelPath::available() {
        // Exact i32 partials against the row-major reference.
        let mut parts = vec![0i32; m * rows * padded];
        w.matmul_group_i32_with(path, group, &x, &mut parts).unwrap();
        for t in 0..m {
            let xt = x.row(t);
            for r in 0..rows {
                for g in 0..padded {
                    let want: i32 = (g * group..((g + 1) * group).min(cols))
                        .map(|c| codes[r * cols + c] as i32 * xt[c] as i32)
                        .sum();
                    assert_eq!(parts[(t * rows + r) * padded + g], want, "{path} G{group} t{t} r{r} g{g}");
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
                    "{path} G{group} t{t} r{r}: {g} vs dense {want}"
                );
            }
        }
        // Every path gives the same bits (same partials, same combination order).
        match &first {
            None => first = Some(got),
            Some(f) => {
                assert!(f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{path} G{group}")
            }
        }
    }
}

fn check_format(format: GgmlType, rows: usize, cols: usize, m: usize, scale: WeightScale, seed: u64) {
    let (codes, scales, dense) = tensor(format, rows, cols, seed);
    let group = format.ternary_group().unwrap();
    // The file's scales run along rows: [rows, cols / group].
    let from_codes: Vec<f32> = (0..rows * cols).map(|i| codes[i] as f32 * scales[i / group]).collect();
    assert_eq!(from_codes, dense, "{format}: dequantized values are code × scale");
    check_matrix(&codes, &scales, group, (rows, cols, m), scale, seed);
}

#[test]
fn every_group_scaled_format_matches_dense_on_every_path() {
    for format in
        [GgmlType::TQ2_0, GgmlType::TQ1_0, GgmlType::Q1_0, GgmlType::Q2_0, GgmlType::PQ2_0, GgmlType::PTQ1_0]
    {
        for (rows, cols, m, seed) in
            [(13, 768, 1, 1), (13, 768, 5, 2), (24, 256, 9, 3), (8, 1024, 3, 4), (1, 512, 2, 5)]
        {
            check_format(format, rows, cols, m, WeightScale::Multiply(1.0), seed);
        }
    }
    check_format(GgmlType::Q2_0, 17, 512, 4, WeightScale::Multiply(0.75), 6);
    check_format(GgmlType::PQ2_0, 9, 512, 2, WeightScale::Divide(4.0), 7);
}

#[test]
fn every_group_size_on_ragged_shapes() {
    // Columns that are not a multiple of the group or of 256: the last group is partial and
    // the padding adds nothing; rows that are not a multiple of 8. From 24 tokens on the x86
    // paths take the panel GEMM: two panels of rows and two K-chunks (61 × 2600), two blocks
    // of tokens (133), against the scalar path's token-by-token sums, bit for bit.
    let mut rng = Lcg(99);
    for group in [32, 64, 128, 256] {
        for (rows, cols, m) in [
            (1usize, 1usize, 1usize),
            (3, 33, 2),
            (9, 300, 1),
            (11, 257, 3),
            (7, 700, 26),
            (16, 2560, 1),
            (61, 2600, 30),
            (9, 300, 133),
        ] {
            let codes: Vec<i8> = (0..rows * cols).map(|_| rng.code()).collect();
            let groups = cols.div_ceil(group);
            let scales: Vec<f32> = (0..rows * groups).map(|_| rng.f().abs() * 0.1 + 0.001).collect();
            check_matrix(&codes, &scales, group, (rows, cols, m), WeightScale::Multiply(1.0), rng.next());
        }
    }
}

#[test]
fn equal_group_scales_agree_with_the_one_scale_kernels() {
    let (rows, cols, m) = (19, 768, 6);
    let mut rng = Lcg(11);
    let codes: Vec<i8> = (0..rows * cols).map(|_| rng.code()).collect();
    let a = 0.0421f32;
    let one = TernaryMatrix::from_ternary(&codes, rows, cols, WeightScale::Multiply(a)).unwrap();
    let x = activations(m, cols, 12);
    let mut y1 = vec![0.0; m * rows];
    one.forward(&x, &mut y1);
    for group in [32, 64, 128, 256] {
        let groups = cols / group;
        let grouped = TernaryMatrix::from_ternary_group_scaled(
            &codes,
            rows,
            cols,
            group,
            &vec![a; rows * groups],
            WeightScale::Multiply(1.0),
        )
        .unwrap();
        let mut y2 = vec![0.0; m * rows];
        grouped.forward(&x, &mut y2);
        let mut parts = vec![0i32; m * rows * groups];
        grouped.matmul_group_i32_with(KernelPath::active(), group, &x, &mut parts).unwrap();
        for (i, (p, q)) in y1.iter().zip(&y2).enumerate() {
            // Both round differently (one product vs one per group), within float noise of the terms.
            let mag: f32 =
                parts[i * groups..(i + 1) * groups].iter().map(|&v| (a * v as f32).abs()).sum::<f32>()
                    / x.scale(i / rows);
            assert!((p - q).abs() <= 1e-6 * mag, "G{group}: {p} vs {q}");
        }
        assert_eq!(grouped.to_ternary(), codes);
    }
}

#[test]
fn group_scale_count_and_size_are_checked() {
    let codes = vec![0i8; 4 * 300];
    // 300 columns: 2 blocks of 256 per row, so 8 scales; 5 groups of 64, so 20.
    assert!(TernaryMatrix::from_ternary_block_scaled(
        &codes,
        4,
        300,
        vec![1.0; 8],
        WeightScale::Multiply(1.0)
    )
    .is_ok());
    assert!(TernaryMatrix::from_ternary_group_scaled(
        &codes,
        4,
        300,
        64,
        &[1.0; 20],
        WeightScale::Multiply(1.0)
    )
    .is_ok());
    let err =
        TernaryMatrix::from_ternary_block_scaled(&codes, 4, 300, vec![1.0; 4], WeightScale::Multiply(1.0))
            .unwrap_err();
    assert!(err.to_string().contains("group scales"), "{err}");
    let err =
        TernaryMatrix::from_ternary_group_scaled(&codes, 4, 300, 48, &[1.0; 28], WeightScale::Multiply(1.0))
            .unwrap_err();
    assert!(err.to_string().contains("48"), "{err}");
}
