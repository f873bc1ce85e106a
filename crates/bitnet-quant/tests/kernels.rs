//! Every kernel path this CPU can run against the scalar reference: integer outputs equal,
//! float outputs bit-identical.

use bitnet_quant::selftest::{check_int6, check_int8, check_path, check_ternary, Case, Fill};
use bitnet_quant::{Int8Matrix, KernelPath, QuantizedActivations, TernaryMatrix, WeightScale};

#[test]
fn every_available_path_matches_the_reference() {
    let paths = KernelPath::available();
    eprintln!("kernel paths exercised: {}", paths.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "));
    for path in paths {
        match check_path(path) {
            Ok(n) => eprintln!("{path}: {n} products equal to the reference"),
            Err(failures) => panic!("{path}: {} mismatches:\n{}", failures.len(), failures.join("\n")),
        }
    }
}

#[test]
fn odd_thread_counts_split_rows_correctly() {
    // Large enough to run on the pool; 3 and 5 threads do not divide the row tiles evenly.
    for threads in [3, 5] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            for path in KernelPath::available() {
                for (m, k, n) in [(1, 2560, 1647), (5, 2560, 203), (17, 1000, 129), (40, 2560, 203)] {
                    let case = Case { m, k, n, fill: Fill::Random, seed: 99 };
                    check_ternary(path, &case).unwrap();
                    check_int8(path, &case).unwrap();
                    check_int6(path, &case).unwrap();
                }
            }
        });
    }
}

#[test]
fn an_unavailable_path_falls_back_to_a_correct_one() {
    let missing = KernelPath::ALL.into_iter().find(|p| !p.is_available());
    if let Some(path) = missing {
        let case = Case { m: 3, k: 300, n: 11, fill: Fill::Random, seed: 5 };
        check_ternary(path, &case).unwrap();
        check_int8(path, &case).unwrap();
        check_int6(path, &case).unwrap();
    }
}

#[test]
fn kernel_names_parse() {
    for p in KernelPath::ALL {
        assert_eq!(KernelPath::parse(p.name()), Some(p));
    }
    assert!(matches!(KernelPath::parse("AVX512"), Some(KernelPath::Avx512Bw | KernelPath::Avx512Vnni)));
    assert!(matches!(KernelPath::parse(" neon "), Some(KernelPath::NeonPlain | KernelPath::NeonDotprod)));
    assert_eq!(KernelPath::parse("sse9"), None);
    assert!(KernelPath::available().contains(&KernelPath::Scalar));
    assert!(KernelPath::best().is_available());
    assert!(KernelPath::active().is_available());
}

#[test]
fn quantized_float_activations_match_the_definition() {
    // forward() over float inputs equals WeightScale::apply(Σ q·t, s_a) with q from the
    // row quantizer, on the active path.
    let (m, k, n) = (4, 777, 13);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
    let codes: Vec<i8> = (0..n * k).map(|i| ((i * 7 + i / 3) % 3) as i8 - 1).collect();
    let w = TernaryMatrix::from_ternary(&codes, n, k, WeightScale::Multiply(0.42)).unwrap();
    let mut qa = QuantizedActivations::new(8, k);
    qa.quantize(&x, m);
    let mut out = vec![0f32; m * n];
    w.forward(&qa, &mut out);
    for t in 0..m {
        let mut q = vec![0i8; k];
        let s = bitnet_quant::quantize_activation_row(&x[t * k..(t + 1) * k], &mut q);
        assert_eq!(qa.row(t), &q[..]);
        assert_eq!(qa.scale(t), s);
        assert_eq!(qa.sum(t), q.iter().map(|&v| v as i32).sum::<i32>());
        assert!(qa.padded_row(t)[k..].iter().all(|&v| v == 0));
        for r in 0..n {
            let acc = bitnet_quant::ternary::dot_i8(&codes[r * k..(r + 1) * k], &q);
            assert_eq!(out[t * n + r].to_bits(), WeightScale::Multiply(0.42).apply(acc, s).to_bits());
        }
    }
}

#[test]
fn empty_shapes_are_fine() {
    for path in KernelPath::available() {
        // K = 0: every dot product is 0.
        let w = TernaryMatrix::from_ternary(&[], 5, 0, WeightScale::Multiply(1.0)).unwrap();
        let mut x = QuantizedActivations::new(2, 0);
        x.quantize(&[], 2);
        let mut out = vec![7i32; 10];
        w.matmul_i32_with(path, &x, &mut out);
        assert_eq!(out, [0; 10]);
        // N = 0 and M = 0 write nothing.
        let w = TernaryMatrix::from_ternary(&[], 0, 9, WeightScale::Multiply(1.0)).unwrap();
        let mut x = QuantizedActivations::new(2, 9);
        x.quantize(&[0.5; 18], 2);
        w.matmul_i32_with(path, &x, &mut []);
        let w8 = Int8Matrix::from_int8(&[1; 9], &[1.0], 1, 9).unwrap();
        x.quantize(&[], 0);
        w8.matmul_i32_with(path, &x, &mut []);
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(TernaryMatrix::from_ternary(&[0; 5], 2, 3, WeightScale::Multiply(1.0)).is_err());
    assert!(TernaryMatrix::from_ternary(&[2], 1, 1, WeightScale::Multiply(1.0)).is_err());
    assert!(TernaryMatrix::from_ternary(&[], usize::MAX, 2, WeightScale::Multiply(1.0)).is_err());
    assert!(Int8Matrix::from_int8(&[0; 6], &[1.0], 2, 3).is_err());
    assert!(Int8Matrix::from_int8(&[-128], &[1.0], 1, 1).is_err());
    assert!(Int8Matrix::from_int6(&[0; 6], &[1.0], 2, 3).is_err());
    assert!(Int8Matrix::from_int6(&[31, -32], &[1.0], 1, 2).is_err());
    assert!(Int8Matrix::from_int6(&[32], &[1.0], 1, 1).is_err());
    assert!(Int8Matrix::from_int6(&[31, -31], &[1.0], 1, 2).is_ok());
    assert!(Int8Matrix::quantize(&[1.0; 5], 2, 3).is_err());
    let mut x = QuantizedActivations::new(2, 3);
    assert!(x.set_int8(&[0; 9], &[1.0; 3], 3).is_err());
    assert!(x.set_int8(&[0; 5], &[1.0; 2], 2).is_err());
}

#[test]
fn int8_matrix_quantizes_per_row() {
    let (n, k) = (3, 5);
    let w: Vec<f32> = vec![1.0, -2.0, 0.5, 0.0, 2.0, 10.0, 5.0, -10.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let m = Int8Matrix::quantize(&w, n, k).unwrap();
    assert_eq!(m.to_int8()[..5], [64, -127, 32, 0, 127]); // 63.5 and 31.75 round to even/nearest
    assert_eq!(m.scales()[0], 2.0 / 127.0);
    assert_eq!(m.to_int8()[5..10], [127, 64, -127, 13, 0]);
    assert_eq!(m.rows(), 3);
    assert_eq!(m.cols(), 5);
}

/// Several matrices in one parallel region give exactly what each gives alone, whatever the
/// thread count and however the tile ranges straddle the matrices.
#[test]
fn forward_many_equals_forward_of_each() {
    let k = 2560;
    let codes = |n: usize, seed: usize| -> Vec<i8> {
        (0..n * k).map(|i| ((i * 7 + seed * 13 + i / 9) % 3) as i8 - 1).collect()
    };
    let (q, kk, v) = (
        TernaryMatrix::from_ternary(&codes(2000, 1), 2000, k, WeightScale::Multiply(0.7)).unwrap(),
        TernaryMatrix::from_ternary(&codes(1645, 2), 1645, k, WeightScale::Divide(1.3)).unwrap(),
        TernaryMatrix::from_ternary(&codes(13, 3), 13, k, WeightScale::Multiply(2.0)).unwrap(),
    );
    // A matrix with per-block scales (TQ files whose blocks differ) takes its own product.
    let scales: Vec<f32> = (0..13 * 10).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
    let blocky =
        TernaryMatrix::from_ternary_block_scaled(&codes(13, 4), 13, k, scales, WeightScale::Multiply(1.0))
            .unwrap();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for m in [1, 3] {
            let xf: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.01).collect();
            let mut x = QuantizedActivations::new(m, k);
            x.quantize(&xf, m);
            let mut alone = [vec![0.0f32; m * 2000], vec![0.0; m * 1645], vec![0.0; m * 13]];
            let mut together = alone.clone();
            pool.install(|| {
                for (w, out) in [&q, &kk, &v].into_iter().zip(alone.iter_mut()) {
                    w.forward(&x, out);
                }
                let [a, b, c] = &mut together;
                TernaryMatrix::forward_many([&q, &kk, &v], &x, [a, b, c]);
            });
            let (mut q_alone, mut b_alone) = (vec![0.0f32; m * 2000], vec![0.0f32; m * 13]);
            let (mut q_many, mut b_many) = (q_alone.clone(), b_alone.clone());
            pool.install(|| {
                q.forward(&x, &mut q_alone);
                blocky.forward(&x, &mut b_alone);
                TernaryMatrix::forward_many([&q, &blocky], &x, [&mut q_many, &mut b_many]);
            });
            assert_eq!(q_alone, q_many, "{threads} threads, m = {m}, with a block-scaled matrix");
            assert_eq!(b_alone, b_many, "{threads} threads, m = {m}: the block-scaled matrix");
            for (a, t) in alone.iter().zip(&together) {
                assert!(
                    a.iter().zip(t).all(|(a, t)| a.to_bits() == t.to_bits()),
                    "{threads} threads, m = {m}"
                );
            }
        }
    }
}

/// `matmul_div_mul` scales each sum as the kernel hands it over: the bits of `matmul_i32`
/// followed by `acc as f32 / div[t] · mul[r]`, on token counts either side of the panel
/// GEMM's switch and on ragged widths and row counts.
#[test]
fn matmul_div_mul_equals_the_scaled_integer_product() {
    let mut state = 11u64;
    let mut next = move |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    for (m, k, rows) in [(1, 256, 9), (5, 31, 17), (24, 256, 67), (130, 800, 50), (37, 1000, 1)] {
        let codes: Vec<i8> = (0..rows * k).map(|_| next(3) as i8 - 1).collect();
        let w = TernaryMatrix::from_ternary(&codes, rows, k, WeightScale::Multiply(1.0)).unwrap();
        let xf: Vec<f32> = (0..m * k).map(|_| next(2001) as f32 / 100.0 - 10.0).collect();
        let mut x = QuantizedActivations::new(m, k);
        x.quantize(&xf, m);
        let div: Vec<f32> = (0..m).map(|_| 0.5 + next(1000) as f32 / 37.0).collect();
        let mul: Vec<f32> = (0..rows).map(|_| 0.01 + next(1000) as f32 / 3000.0).collect();
        let mut sums = vec![0i32; m * rows];
        w.matmul_i32(&x, &mut sums);
        let want: Vec<f32> =
            sums.iter().enumerate().map(|(i, &acc)| acc as f32 / div[i / rows] * mul[i % rows]).collect();
        let mut got = vec![f32::NAN; m * rows];
        w.matmul_div_mul(&x, &div, &mul, &mut got);
        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "m={m} k={k} rows={rows}: matmul_div_mul differs from the scaled matmul_i32");
    }
}

#[test]
fn a_head_built_by_row_blocks_equals_one_built_whole() {
    // 2100 rows: two full blocks of 1024 rows and a ragged one that ends inside a row tile;
    // 300 columns pad to 512.
    let (rows, cols) = (2100, 300);
    for (bits, max) in [(8u32, 127i32), (6, 31)] {
        let code = |r: usize, c: usize| ((r * 31 + c * 17 + r * c) % (2 * max as usize + 1)) as i32 - max;
        let q: Vec<i8> = (0..rows * cols).map(|i| code(i / cols, i % cols) as i8).collect();
        let scales: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 / 64.0).collect();
        let whole = match bits {
            8 => Int8Matrix::from_int8(&q, &scales, rows, cols).unwrap(),
            _ => Int8Matrix::from_int6(&q, &scales, rows, cols).unwrap(),
        };
        let blocks = Int8Matrix::from_row_blocks(bits, rows, cols, |first, codes, sb| {
            codes.copy_from_slice(&q[first * cols..first * cols + codes.len()]);
            sb.copy_from_slice(&scales[first..first + sb.len()]);
        })
        .unwrap();
        assert_eq!(blocks.bits(), bits);
        assert_eq!(blocks.scales(), &scales[..]);
        assert_eq!(blocks.to_int8(), q, "{bits} bits");
        assert_eq!(blocks.bytes(), whole.bytes());
        // The same products: every row is where the kernels look for it.
        let mut x = QuantizedActivations::new(1, cols);
        let input: Vec<f32> = (0..cols).map(|c| (c as f32 * 0.37).sin()).collect();
        x.quantize(&input, 1);
        let (mut a, mut b) = (vec![0i32; rows], vec![0i32; rows]);
        whole.matmul_i32(&x, &mut a);
        blocks.matmul_i32(&x, &mut b);
        assert_eq!(a, b, "{bits} bits");
    }
    // A code out of range names its block; other bit widths are refused.
    let err = Int8Matrix::from_row_blocks(6, 1100, 8, |first, codes, sb| {
        codes.fill(if first == 1024 { 32 } else { 0 });
        sb.fill(1.0);
    })
    .unwrap_err();
    assert!(err.to_string().contains("rows from 1024"), "{err}");
    assert!(Int8Matrix::from_row_blocks(4, 8, 8, |_, _, _| {}).is_err());
}

#[test]
fn a_ternary_matrix_built_by_row_blocks_equals_one_built_whole() {
    // 2100 rows of 300 columns: blocks of 880 rows (whole tiles), the last one ragged.
    let (rows, cols) = (2100, 300);
    let codes: Vec<i8> = (0..rows * cols).map(|i| ((i * 7 + i / cols) % 3) as i8 - 1).collect();
    let scale = WeightScale::Divide(3.0);
    let whole = TernaryMatrix::from_ternary(&codes, rows, cols, scale).unwrap();
    let blocks = TernaryMatrix::from_row_blocks(rows, cols, scale, |first, out| {
        out.copy_from_slice(&codes[first * cols..first * cols + out.len()]);
        Ok::<(), bitnet_quant::QuantError>(())
    })
    .unwrap();
    assert_eq!(blocks.to_ternary(), codes);
    assert_eq!((blocks.bytes(), blocks.scale()), (whole.bytes(), scale));
    let mut x = QuantizedActivations::new(3, cols);
    let input: Vec<f32> = (0..3 * cols).map(|c| (c as f32 * 0.21).cos()).collect();
    x.quantize(&input, 3);
    let (mut a, mut b) = (vec![0.0; 3 * rows], vec![0.0; 3 * rows]);
    whole.forward(&x, &mut a);
    blocks.forward(&x, &mut b);
    assert_eq!(a, b);
    // Block scales go on afterwards, checked as from_ternary_block_scaled checks them.
    let d: Vec<f32> = (0..rows * 2).map(|i| 1.0 + i as f32 / 8.0).collect();
    let scaled = blocks.clone().with_group_scales(256, &d).unwrap();
    assert_eq!(scaled.group_scales().map(|g| g.to_row_major()), Some(d.clone()));
    assert!(blocks.with_group_scales(256, &vec![1.0; rows]).is_err());
    // A code out of range names its row and column.
    let err = TernaryMatrix::from_row_blocks(rows, cols, scale, |first, out| {
        out.fill(0);
        if first == 880 {
            out[cols + 5] = 2;
        }
        Ok::<(), bitnet_quant::QuantError>(())
    })
    .unwrap_err();
    assert!(err.to_string().contains("ternary code 2 at row 881, column 5"), "{err}");
}
