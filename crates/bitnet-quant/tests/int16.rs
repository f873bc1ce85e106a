//! The i16 × int8 product (`gemm_i16_i8`) against a plain f64-free definition and across
//! kernel paths: the integer sums must be equal and the f32 results bit-identical.

use bitnet_quant::int16::{
    gemm_i16_i8_with, quantize_columns_i16, quantize_rows_i16, ALayout, I16Rows, PackedPairs, ScaledOut,
    K_CHUNK,
};
use bitnet_quant::selftest::Rng;
use bitnet_quant::KernelPath;

/// The definition, written out: chunked i32 sums, each added with one fused multiply-add.
fn definition(
    a: (&[i16], usize),
    m: usize,
    b: (&[i8], usize, usize),
    scale: &[f32],
    init: &[f32],
) -> Vec<f32> {
    let ((a, lda), (b, k, n)) = (a, b);
    let mut out = init.to_vec();
    for r in 0..m {
        for c in 0..n {
            let mut acc = init[r * n + c];
            for chunk in (0..k).step_by(K_CHUNK) {
                let s: i32 = (chunk..(chunk + K_CHUNK).min(k))
                    .map(|j| a[r * lda + j] as i32 * b[j * n + c] as i32)
                    .sum();
                acc = scale[r].mul_add(s as f32, acc);
            }
            out[r * n + c] = acc;
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Fill {
    Random,
    Extreme,
}

fn case(path: KernelPath, m: usize, k: usize, n: usize, fill: Fill, accumulate: bool, rng: &mut Rng) {
    let lda = 2 * k.div_ceil(2) + 3; // a stride wider than a row
    let a: Vec<i16> = (0..m * lda + 1)
        .map(|_| match fill {
            Fill::Random => rng.range(-32768, 32767) as i16,
            Fill::Extreme => -32768,
        })
        .collect();
    let b: Vec<i8> = (0..k * n)
        .map(|_| match fill {
            Fill::Random => rng.range(-128, 127) as i8,
            Fill::Extreme => -128,
        })
        .collect();
    let scale: Vec<f32> = (0..m).map(|_| rng.range(1, 1000) as f32 * 1e-9).collect();
    let init: Vec<f32> = (0..m * n).map(|_| rng.range(-1000, 1000) as f32 * 1e-3).collect();
    let packed = PackedPairs::from_i8(&b, k, n).unwrap();
    let mut out = if accumulate { init.clone() } else { vec![f32::NAN; m * n] };
    let out_arg = ScaledOut { out: &mut out, ldo: n, row_scale: &scale, accumulate };
    gemm_i16_i8_with(path, I16Rows { data: &a, m, layout: ALayout::RowMajor { lda } }, &packed, out_arg)
        .unwrap();
    let zeros = vec![0.0; m * n];
    let want = definition((&a, lda), m, (&b, k, n), &scale, if accumulate { &init } else { &zeros });
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out), bits(&want), "{path} m={m} k={k} n={n} accumulate={accumulate}");
    // The same operand with its rows pairwise interleaved (ld = m + 1) gives the same bits.
    let ld = m + 1;
    let pairs = k.div_ceil(2);
    let mut inter = vec![7i16; pairs * ld * 2];
    for r in 0..m {
        for j in 0..k {
            inter[((j / 2) * ld + r) * 2 + j % 2] = a[r * lda + j];
        }
    }
    let mut out2 = if accumulate { init.clone() } else { vec![f32::NAN; m * n] };
    let out_arg = ScaledOut { out: &mut out2, ldo: n, row_scale: &scale, accumulate };
    let a2 = I16Rows { data: &inter, m, layout: ALayout::PairInterleaved { ld } };
    gemm_i16_i8_with(path, a2, &packed, out_arg).unwrap();
    assert_eq!(bits(&out2), bits(&want), "{path} interleaved m={m} k={k} n={n}");
}

#[test]
fn every_path_equals_the_definition_on_ragged_shapes() {
    let mut rng = Rng::new(16);
    for path in KernelPath::available() {
        // Rows around the 6-row tile and the 48-row block, K around a chunk (odd too) and a
        // K-block, columns around the 16-column panel.
        for &m in &[1, 5, 6, 7, 49] {
            for &k in &[1, 2, 3, 255, 256, 257, 600] {
                for &n in &[1, 15, 16, 17, 40] {
                    case(path, m, k, n, Fill::Random, m % 2 == 1, &mut rng);
                }
            }
        }
        // The largest magnitudes fill a whole chunk without wrapping.
        case(path, 7, 2 * K_CHUNK + 1, 17, Fill::Extreme, false, &mut rng);
        case(path, 3, 1100, 33, Fill::Random, true, &mut rng);
    }
}

#[test]
fn a_reused_packing_buffer_holds_exactly_the_new_matrix() {
    // A buffer that held a larger matrix of nonzero values, repacked with odd k and a ragged
    // last panel: its padding and its missing odd row must be zeros again, as in a fresh one.
    let mut rng = Rng::new(17);
    let big: Vec<i8> = (0..301 * 70).map(|_| rng.range(1, 127) as i8).collect();
    for (k, n) in [(7usize, 17usize), (1, 1), (33, 40), (300, 5)] {
        let mut reused = PackedPairs::from_i8(&big, 301, 70).unwrap();
        let b: Vec<i8> = (0..k * n).map(|_| rng.range(-128, 127) as i8).collect();
        reused.repack(k, n, |r| &b[r * n..(r + 1) * n]);
        assert_eq!(reused, PackedPairs::from_i8(&b, k, n).unwrap(), "k={k} n={n}");
    }
}

#[test]
fn empty_sums_give_zero_or_leave_the_output() {
    let packed = PackedPairs::from_i8(&[], 0, 3).unwrap();
    let mut out = vec![f32::NAN; 6];
    let scale = [1.0, 1.0];
    let a = I16Rows { data: &[], m: 2, layout: ALayout::RowMajor { lda: 0 } };
    gemm_i16_i8_with(
        KernelPath::active(),
        a,
        &packed,
        ScaledOut { out: &mut out, ldo: 3, row_scale: &scale, accumulate: false },
    )
    .unwrap();
    assert_eq!(out, vec![0.0; 6]);
    let mut out = vec![-0.0; 6];
    gemm_i16_i8_with(
        KernelPath::active(),
        a,
        &packed,
        ScaledOut { out: &mut out, ldo: 3, row_scale: &scale, accumulate: true },
    )
    .unwrap();
    assert!(out.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()));
}

#[test]
fn short_operands_are_errors() {
    let packed = PackedPairs::from_i8(&[1; 12], 4, 3).unwrap();
    let scale = [1.0; 2];
    let mut out = vec![0.0; 6];
    // Two rows of 4 need 4 + stride values.
    let a = I16Rows { data: &[0; 5], m: 2, layout: ALayout::RowMajor { lda: 4 } };
    let err = gemm_i16_i8_with(
        KernelPath::active(),
        a,
        &packed,
        ScaledOut { out: &mut out, ldo: 3, row_scale: &scale, accumulate: false },
    );
    assert!(err.unwrap_err().to_string().contains("does not hold 2 rows"));
    let short = I16Rows { data: &[0; 7], m: 2, layout: ALayout::PairInterleaved { ld: 2 } };
    let err = gemm_i16_i8_with(
        KernelPath::active(),
        short,
        &packed,
        ScaledOut { out: &mut out, ldo: 3, row_scale: &scale, accumulate: false },
    );
    assert!(err.unwrap_err().to_string().contains("does not hold 2 rows"));
    let a = I16Rows { data: &[0; 8], m: 2, layout: ALayout::RowMajor { lda: 4 } };
    let mut short = vec![0.0; 5];
    let err = gemm_i16_i8_with(
        KernelPath::active(),
        a,
        &packed,
        ScaledOut { out: &mut short, ldo: 3, row_scale: &scale, accumulate: false },
    );
    assert!(err.unwrap_err().to_string().contains("does not hold 2 x 3"));
    let err = gemm_i16_i8_with(
        KernelPath::active(),
        a,
        &packed,
        ScaledOut { out: &mut out, ldo: 3, row_scale: &scale[..1], accumulate: false },
    );
    assert!(err.unwrap_err().to_string().contains("row scales"));
}

/// `round(v)` to even, the quantizers' rounding.
fn code(v: f32) -> i16 {
    v.clamp(-32767.0, 32767.0).round_ties_even() as i16
}

#[test]
fn row_quantizer_follows_its_definition() {
    let mut rng = Rng::new(9);
    for (rows, n, lda) in [(1usize, 1usize, 2usize), (3, 7, 8), (17, 33, 34), (20, 256, 256)] {
        let x: Vec<f32> = (0..rows * n).map(|_| rng.range(-100_000, 100_000) as f32 * 1e-7).collect();
        let mul: Vec<f32> = (0..n).map(|_| rng.range(1, 100) as f32 * 0.01).collect();
        let mut q = vec![99i16; rows * lda];
        let mut scale = vec![f32::NAN; rows];
        quantize_rows_i16(&x, n, &mul, &mut q, lda, &mut scale);
        for r in 0..rows {
            let v: Vec<f32> = (0..n).map(|j| x[r * n + j] * mul[j]).collect();
            let amax = v.iter().fold(0f32, |m, a| m.max(a.abs()));
            assert_eq!(scale[r].to_bits(), (amax / 32767.0).to_bits());
            for j in 0..lda {
                let want = if j < n { code(v[j] * (32767.0 / amax)) } else { 0 };
                assert_eq!(q[r * lda + j], want, "row {r} col {j}");
            }
            assert!(q[r * lda..r * lda + n].iter().any(|&c| c.abs() == 32767));
        }
    }
    // No columns: zero codes (the padding) and scales.
    let mut q = vec![5i16; 4];
    let mut scale = [1.0f32; 2];
    quantize_rows_i16(&[], 0, &[], &mut q, 2, &mut scale);
    assert_eq!((q, scale), (vec![0; 4], [0.0; 2]));
    // An all-zero row has scale 0 and zero codes.
    let mut q = vec![5i16; 4];
    let mut scale = [1.0f32];
    quantize_rows_i16(&[0.0; 3], 3, &[1.0; 3], &mut q, 4, &mut scale);
    assert_eq!((q, scale[0]), (vec![0; 4], 0.0));
}

#[test]
fn column_quantizer_follows_its_definition() {
    let mut rng = Rng::new(10);
    for (rows, n) in [(1usize, 1usize), (2, 5), (7, 16), (33, 19), (64, 256)] {
        let x: Vec<f32> = (0..rows * n).map(|_| rng.range(-100_000, 100_000) as f32 * 1e-7).collect();
        let div: Vec<f32> = (0..rows).map(|_| rng.range(1, 1000) as f32 * 0.1).collect();
        let mut q = vec![99i16; rows.div_ceil(2) * n * 2];
        let mut scale = vec![f32::NAN; n];
        quantize_columns_i16(&x, &div, &mut q, &mut scale);
        for o in 0..n {
            let v: Vec<f32> = (0..rows).map(|t| x[t * n + o] / div[t]).collect();
            let amax = v.iter().fold(0f32, |m, a| m.max(a.abs()));
            assert_eq!(scale[o].to_bits(), (amax / 32767.0).to_bits());
            for t in 0..rows.next_multiple_of(2) {
                let want = if t < rows { code(v[t] * (32767.0 / amax)) } else { 0 };
                assert_eq!(q[((t / 2) * n + o) * 2 + t % 2], want, "token {t} feature {o}");
            }
        }
    }
}
