//! Dense layers in their stored formats: every kernel path against the scalar reference (equal
//! bits for the block formats, within `float_dot_bound` for the float ones), the reference
//! against an f64 dequantize-then-matmul of the same quantized activations, the activation
//! quantizers against ggml's definitions, and typed errors for bad sizes.

use bitnet_quant::dense::{
    scalar, ActivationKind, DenseActivations, DenseError, DenseFormat, DenseLinear, Q40Lanes, Q41Lanes,
    Q4Lanes, Q6Lanes, Q8Lanes,
};
use bitnet_quant::formats::{self, float, GgmlType};
use bitnet_quant::selftest::Rng;
use bitnet_quant::KernelPath;

/// A float in `[-1, 1)`.
fn unit(rng: &mut Rng) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// f16 bits of a scale of random sign and magnitude in `[2⁻¹², 2⁻⁴]`.
fn scale_bits(rng: &mut Rng) -> [u8; 2] {
    let mag = (2.0f32).powf(-4.0 - 8.0 * (rng.next_u64() % 1000) as f32 / 1000.0);
    let sign = if rng.next_u64().is_multiple_of(2) { 1.0 } else { -1.0 };
    float::f32_to_f16_bits(sign * mag).to_le_bytes()
}

/// How the weight codes of a random matrix are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Codes {
    Random,
    /// Every code byte 0xFF (the largest nibbles, 6-bit values and, for Q8_0, -1) or 0x80
    /// (Q8_0's -128): the largest integer partial sums.
    Extreme,
    /// As `Random` and `Extreme`, with Q8_0's codes within ±127 as quantizers write them (no
    /// -128: the AVX2 rows-in-lanes kernel negates such codes; other formats as `Random` and
    /// `Extreme`).
    Symmetric,
    ExtremeSymmetric,
}

/// A `[rows, cols]` matrix of `format` with random bytes where the format allows any (codes,
/// K-quant sub-scales) and scales of moderate size.
fn random_matrix(format: DenseFormat, rows: usize, cols: usize, codes: Codes, rng: &mut Rng) -> DenseLinear {
    let (block, bb) = (format.block(), format.block_bytes());
    let mut bytes = Vec::with_capacity(rows * cols / block * bb);
    let q8 = format == DenseFormat::Q8_0;
    let code = |rng: &mut Rng| match codes {
        Codes::Random => rng.next_u64() as u8,
        Codes::Symmetric => match rng.next_u64() as u8 {
            0x80 if q8 => 0x81,
            byte => byte,
        },
        Codes::Extreme if q8 => 0x80,
        Codes::ExtremeSymmetric if q8 => 0x81,
        Codes::Extreme | Codes::ExtremeSymmetric => 0xFF,
    };
    for _ in 0..rows * cols / block {
        match format {
            DenseFormat::F32 => bytes.extend_from_slice(&unit(rng).to_le_bytes()),
            DenseFormat::F16 => bytes.extend_from_slice(&float::f32_to_f16_bits(unit(rng)).to_le_bytes()),
            DenseFormat::BF16 => bytes.extend_from_slice(&float::f32_to_bf16_bits(unit(rng)).to_le_bytes()),
            DenseFormat::Q8_0 | DenseFormat::Q4_0 => {
                bytes.extend_from_slice(&scale_bits(rng));
                (2..bb).for_each(|_| bytes.push(code(rng)));
            }
            DenseFormat::Q4_1 => {
                bytes.extend_from_slice(&scale_bits(rng));
                bytes.extend_from_slice(&scale_bits(rng));
                (4..bb).for_each(|_| bytes.push(code(rng)));
            }
            DenseFormat::Q4_K => {
                bytes.extend_from_slice(&scale_bits(rng));
                bytes.extend_from_slice(&scale_bits(rng));
                (4..16).for_each(|_| bytes.push(rng.next_u64() as u8));
                (16..bb).for_each(|_| bytes.push(code(rng)));
            }
            DenseFormat::Q6_K => {
                (0..192).for_each(|_| bytes.push(code(rng)));
                (192..208).for_each(|_| bytes.push(rng.next_u64() as u8));
                bytes.extend_from_slice(&scale_bits(rng));
            }
            // Ternary tables: a block of random floats through the format's quantizer.
            ternary => {
                let x: Vec<f32> = (0..block).map(|_| unit(rng)).collect();
                bytes.extend(bitnet_quant::formats::quantize(ternary.ggml(), &x).unwrap());
            }
        }
    }
    DenseLinear::from_bytes(format.ggml(), rows, cols, &bytes).unwrap()
}

/// How the activations are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Inputs {
    Random,
    /// ±1 alternating: every quantized value ±127.
    Extreme,
}

fn random_inputs(m: usize, k: usize, inputs: Inputs, rng: &mut Rng) -> Vec<f32> {
    (0..m * k)
        .map(|i| match inputs {
            Inputs::Random => unit(rng) * 3.0,
            Inputs::Extreme => [1.0, -1.0][i % 2],
        })
        .collect()
}

/// Columns of the shapes checked: whole blocks, ragged block counts, SmolLM2's 576.
fn widths(format: DenseFormat) -> Vec<usize> {
    match format.block() {
        1 => vec![1, 7, 8, 33, 64, 100, 576],
        32 => vec![32, 96, 160, 576],
        _ => vec![256, 768],
    }
}

const ROWS: [usize; 5] = [1, 3, 8, 13, 33];
const TOKENS: [usize; 8] = [1, 2, 3, 4, 5, 6, 7, 33];

/// `Σ_c |W[r, c] · x[t, c]|` in f64, for the float bound.
fn abs_dot(w: &[f32], x: &[f32]) -> f64 {
    w.iter().zip(x).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum()
}

/// Every available kernel path against the scalar reference, on one matrix and input.
fn check_paths(w: &DenseLinear, x: &[f32], m: usize) -> Result<(), String> {
    let (rows, cols, format) = (w.rows(), w.cols(), w.format());
    let mut a = DenseActivations::new();
    a.quantize(w.activation_kind(), x, m, cols).unwrap();
    let dense = w.to_f32();
    for path in KernelPath::available() {
        let mut out = vec![f32::NAN; m * rows];
        w.forward_quantized_with(path, &a, &mut out).unwrap();
        for t in 0..m {
            for r in 0..rows {
                let want =
                    scalar::dot_row(format, &w.as_bytes()[r * w.row_bytes()..(r + 1) * w.row_bytes()], &a, t);
                let got = out[t * rows + r];
                let ok = if format.is_float() {
                    let bound = bitnet_quant::dense::float_dot_bound(
                        cols,
                        abs_dot(&dense[r * cols..(r + 1) * cols], &x[t * cols..(t + 1) * cols]),
                    );
                    (f64::from(got) - f64::from(want)).abs() <= bound
                } else {
                    got.to_bits() == want.to_bits()
                };
                if !ok {
                    return Err(format!(
                        "{format} {path} [{rows}x{cols}] m={m} t={t} r={r}: {got} vs reference {want}"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_path_equals_the_scalar_reference_on_ragged_shapes() {
    eprintln!("paths: {:?}", KernelPath::available());
    let mut rng = Rng::new(7);
    let mut checked = 0;
    for format in DenseFormat::ALL {
        for cols in widths(format) {
            for rows in ROWS {
                for m in TOKENS {
                    // Keep the largest shapes to a few token counts (the suite also runs under qemu).
                    if cols >= 576 && !matches!(m, 1 | 3 | 33) {
                        continue;
                    }
                    let w = random_matrix(format, rows, cols, Codes::Random, &mut rng);
                    let x = random_inputs(m, cols, Inputs::Random, &mut rng);
                    check_paths(&w, &x, m).unwrap();
                    checked += 1;
                }
            }
        }
    }
    eprintln!("{checked} products equal to the reference");
}

#[test]
fn extreme_codes_and_inputs_stay_exact() {
    let mut rng = Rng::new(11);
    for format in DenseFormat::ALL.into_iter().filter(|f| !f.is_float()) {
        let cols = 4 * format.block().max(64);
        for codes in [Codes::Random, Codes::Extreme] {
            for inputs in [Inputs::Random, Inputs::Extreme] {
                let w = random_matrix(format, 11, cols, codes, &mut rng);
                let x = random_inputs(3, cols, inputs, &mut rng);
                check_paths(&w, &x, 3).unwrap_or_else(|e| panic!("{codes:?} codes, {inputs:?} inputs: {e}"));
            }
        }
    }
}

#[test]
fn odd_thread_counts_split_rows_correctly() {
    let mut rng = Rng::new(3);
    for threads in [3, 5] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            for format in DenseFormat::ALL {
                // Big enough for the pool: above the parallel thresholds.
                let (rows, cols, m) = (1003, 1536, if format.is_float() { 1 } else { 3 });
                let w = random_matrix(format, rows, cols, Codes::Random, &mut rng);
                let x = random_inputs(m, cols, Inputs::Random, &mut rng);
                let mut a = DenseActivations::new();
                a.quantize(w.activation_kind(), &x, m, cols).unwrap();
                let mut pooled = vec![0.0; m * rows];
                w.forward_quantized(&a, &mut pooled).unwrap();
                let mut solo = vec![0.0; m * rows];
                let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
                single.install(|| w.forward_quantized(&a, &mut solo).unwrap());
                assert_eq!(
                    pooled.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    solo.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{format}: {threads} threads"
                );
            }
        });
    }
}

/// The f64 value of `w[r] · a[t]` with the activations dequantized (`q · d`), and the scale of
/// the terms it sums (for the bound).
fn dequantized_dot(row: &[f32], a: &DenseActivations, t: usize) -> (f64, f64) {
    let kind = a.kind();
    let (q, d) = (a.values(t), a.scales(t));
    let act = |c: usize| f64::from(q[c]) * f64::from(d[c / kind.block()]);
    let mut exact = 0.0f64;
    let mut magnitude = 0.0f64;
    for (c, &w) in row.iter().enumerate() {
        exact += f64::from(w) * act(c);
        magnitude += f64::from(w).abs() * act(c).abs();
    }
    (exact, magnitude)
}

/// The offsets (Q4_1's `m`, Q4_K's `dmin · m_j`) of each column of row `r`, and for Q4_1 the
/// f64 difference between the reference's min term `Σ_b m_b · s_b` (with the f16-rounded Q8_1
/// sum) and the dequantized product's `Σ_b m_b · d_a · Σ q_a`.
fn offsets(w: &DenseLinear, r: usize, a: &DenseActivations, t: usize) -> (Vec<f64>, f64) {
    let row = &w.as_bytes()[r * w.row_bytes()..(r + 1) * w.row_bytes()];
    let f16 = |b: &[u8], at: usize| f64::from(float::f16_bits_to_f32(u16::from_le_bytes([b[at], b[at + 1]])));
    match w.format() {
        DenseFormat::Q4_1 => {
            let (d, s, sums) = (a.scales(t), a.scaled_sums(t), a.sums(t));
            let mut fix = 0.0;
            let mut offs = Vec::new();
            for (b, blk) in row.chunks_exact(20).enumerate() {
                let m = f16(blk, 2);
                fix += m * (f64::from(s[b]) - f64::from(d[b]) * f64::from(sums[b]));
                offs.extend(std::iter::repeat_n(m.abs(), 32));
            }
            (offs, fix)
        }
        DenseFormat::Q4_K => {
            let mut offs = Vec::new();
            for blk in row.chunks_exact(144) {
                for j in 0..8 {
                    let sc = &blk[4..16];
                    let m = if j < 4 { sc[j + 4] & 63 } else { (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4) };
                    offs.extend(std::iter::repeat_n((f16(blk, 2) * f64::from(m)).abs(), 32));
                }
            }
            (offs, 0.0)
        }
        _ => (vec![0.0; w.cols()], 0.0),
    }
}

#[test]
fn the_reference_matches_an_f64_dequantized_product() {
    let mut rng = Rng::new(21);
    for format in DenseFormat::ALL.into_iter().filter(|f| !f.is_float()) {
        for cols in [format.block().max(256), 2048] {
            let (rows, m) = (9, 4);
            let w = random_matrix(format, rows, cols, Codes::Random, &mut rng);
            let dense = w.to_f32();
            let x = random_inputs(m, cols, Inputs::Random, &mut rng);
            let mut a = DenseActivations::new();
            a.quantize(w.activation_kind(), &x, m, cols).unwrap();
            let mut out = vec![0.0; m * rows];
            w.forward_quantized_with(KernelPath::Scalar, &a, &mut out).unwrap();
            for t in 0..m {
                for r in 0..rows {
                    let row = &dense[r * cols..(r + 1) * cols];
                    let (exact, magnitude) = dequantized_dot(row, &a, t);
                    let (offs, fix) = offsets(&w, r, &a, t);
                    let kind = a.kind();
                    let off_mag: f64 = (0..cols)
                        .map(|c| {
                            offs[c]
                                * (f64::from(a.values(t)[c]) * f64::from(a.scales(t)[c / kind.block()])).abs()
                        })
                        .sum();
                    let want = exact + fix;
                    // f32 rounding of each weight, of each block term and of the block sums.
                    let blocks = (cols / format.block()) as f64;
                    let bound = (blocks + 8.0) * f64::from(f32::EPSILON) * (magnitude + 2.0 * off_mag);
                    let got = f64::from(out[t * rows + r]);
                    assert!(
                        (got - want).abs() <= bound,
                        "{format} [{rows}x{cols}] t{t} r{r}: {got} vs f64 {want} (bound {bound:e})"
                    );
                }
            }
        }
    }
}

#[test]
fn q8_blocks_follow_ggml_quantize_row_q8_1() {
    let mut rng = Rng::new(5);
    let x: Vec<f32> = (0..64).map(|_| unit(&mut rng) * 2.5).collect();
    let mut a = DenseActivations::new();
    a.quantize(ActivationKind::Q8Blocks, &x, 1, 64).unwrap();
    for b in 0..2 {
        let xb = &x[32 * b..32 * b + 32];
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = 127.0 / amax;
        let q: Vec<i8> = xb.iter().map(|&v| (v * id).round_ties_even() as i8).collect();
        assert_eq!(&a.values(0)[32 * b..32 * b + 32], &q[..]);
        assert!(q.iter().any(|&v| v.abs() == 127), "the largest value maps to ±127");
        let d16 = float::f16_bits_to_f32(float::f32_to_f16_bits(d));
        assert_eq!(a.scales(0)[b].to_bits(), d16.to_bits());
        let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
        assert_eq!(a.sums(0)[b], sum);
        let s16 = float::f16_bits_to_f32(float::f32_to_f16_bits(d * sum as f32));
        assert_eq!(a.scaled_sums(0)[b].to_bits(), s16.to_bits());
    }
    // An all-zero block: scale 0, values 0.
    a.quantize(ActivationKind::Q8Blocks, &[0.0; 32], 1, 32).unwrap();
    assert_eq!((a.scales(0)[0], a.values(0).iter().all(|&v| v == 0)), (0.0, true));
}

#[test]
fn q8_k_follows_ggml_quantize_row_q8_k_ref() {
    let mut rng = Rng::new(6);
    let mut x: Vec<f32> = (0..512).map(|_| unit(&mut rng)).collect();
    x[300] = 4.0; // the block's largest value, positive: its code is -127 and d < 0
    let mut a = DenseActivations::new();
    a.quantize(ActivationKind::Q8K, &x, 1, 512).unwrap();
    assert_eq!(a.values(0)[300], -127);
    let d = a.scales(0)[1];
    assert_eq!(d.to_bits(), (1.0f32 / (-127.0f32 / 4.0)).to_bits());
    for (i, (&q, &v)) in a.values(0)[256..].iter().zip(&x[256..]).enumerate() {
        assert_eq!(q, ((-127.0f32 / 4.0) * v).round_ties_even() as i8, "element {i}");
    }
    for g in 0..32 {
        let want: i32 = a.values(0)[16 * g..16 * g + 16].iter().map(|&v| i32::from(v)).sum();
        assert_eq!(a.sums(0)[g], want, "bsum {g}");
    }
    // Dequantized, each value is within half a step of the input.
    for b in 0..2 {
        let d = a.scales(0)[b];
        let values = &a.values(0)[256 * b..256 * b + 256];
        for (&q, &v) in values.iter().zip(&x[256 * b..256 * b + 256]) {
            assert!((f32::from(q) * d - v).abs() <= d.abs() * 0.5001);
        }
    }
}

#[test]
fn forward_quantizes_as_forward_quantized_and_forward_many_equals_each() {
    let mut rng = Rng::new(9);
    for format in DenseFormat::ALL {
        let cols = 512;
        let mats: Vec<DenseLinear> =
            [17, 5, 9].iter().map(|&r| random_matrix(format, r, cols, Codes::Random, &mut rng)).collect();
        let m = 3;
        let x = random_inputs(m, cols, Inputs::Random, &mut rng);
        let mut a = DenseActivations::new();
        a.quantize(format.activation_kind(), &x, m, cols).unwrap();
        let mut each = Vec::new();
        for w in &mats {
            let mut direct = vec![0.0; m * w.rows()];
            w.forward(&x, m, &mut direct).unwrap();
            let mut pre = vec![0.0; m * w.rows()];
            w.forward_quantized(&a, &mut pre).unwrap();
            assert_eq!(direct, pre, "{format}");
            each.push(pre);
        }
        let (mut o0, mut o1, mut o2) = (vec![0.0; m * 17], vec![0.0; m * 5], vec![0.0; m * 9]);
        DenseLinear::forward_many([&mats[0], &mats[1], &mats[2]], &a, [&mut o0, &mut o1, &mut o2]).unwrap();
        assert_eq!([o0, o1, o2].to_vec(), each, "{format}");
    }
}

#[test]
fn rows_dequantize_and_permute_as_stored() {
    let mut rng = Rng::new(13);
    for format in DenseFormat::ALL {
        let (rows, cols) = (5, 256);
        let w = random_matrix(format, rows, cols, Codes::Random, &mut rng);
        let all = formats::dequantize(format.ggml(), w.as_bytes(), rows * cols).unwrap();
        assert_eq!(w.to_f32(), all);
        let mut row = vec![0.0; cols];
        w.dequantize_row(3, &mut row).unwrap();
        assert_eq!(row, all[3 * cols..4 * cols]);
        let p = w.permute_rows(&[4, 2, 0, 1, 3]).unwrap();
        p.dequantize_row(0, &mut row).unwrap();
        assert_eq!(row, all[4 * cols..5 * cols]);
        assert_eq!(p.bytes(), w.bytes());
        assert!(matches!(w.permute_rows(&[0, 0, 1, 2, 3]), Err(DenseError::RowOutOfRange { row: 0, .. })));
        let m = w.to_dense_matrix();
        assert_eq!((m.rows, m.cols, m.to_f32()), (rows, cols, all.clone()));
        if format.is_float() {
            assert_eq!(DenseLinear::from_dense_matrix(&m).unwrap().as_bytes(), w.as_bytes(), "{format}");
        }
    }
}

#[test]
fn encoded_floats_run_and_match_their_dequantized_values() {
    // Q8_0 and Q6_K through the crate's quantizers: the product stays close to the float one.
    let mut rng = Rng::new(17);
    let (rows, cols) = (6, 512);
    let wf: Vec<f32> = (0..rows * cols).map(|_| unit(&mut rng) * 0.1).collect();
    let x = random_inputs(1, cols, Inputs::Random, &mut rng);
    for format in
        [DenseFormat::F32, DenseFormat::F16, DenseFormat::BF16, DenseFormat::Q8_0, DenseFormat::Q6_K]
    {
        let w = DenseLinear::encode(format, &wf, rows, cols).unwrap();
        let mut out = vec![0.0; rows];
        w.forward(&x, 1, &mut out).unwrap();
        for r in 0..rows {
            let exact: f64 = (0..cols).map(|c| f64::from(wf[r * cols + c]) * f64::from(x[c])).sum();
            let scale: f64 = (0..cols).map(|c| (f64::from(wf[r * cols + c]) * f64::from(x[c])).abs()).sum();
            let tol = if format.is_float() { 1e-2 } else { 3e-2 } * scale;
            assert!((f64::from(out[r]) - exact).abs() <= tol, "{format} r{r}: {} vs {exact}", out[r]);
        }
    }
}

#[test]
fn bad_sizes_are_typed_errors() {
    let q = |n: usize| vec![0u8; n];
    assert_eq!(
        DenseLinear::from_bytes(GgmlType::Q4_1, 2, 64, &q(79)).unwrap_err(),
        DenseError::ByteLength { format: DenseFormat::Q4_1, rows: 2, cols: 64, expected: 80, got: 79 }
    );
    assert_eq!(
        DenseLinear::from_bytes(GgmlType::Q4_K, 1, 128, &q(72)).unwrap_err(),
        DenseError::NotBlockMultiple { format: DenseFormat::Q4_K, cols: 128, block: 256 }
    );
    assert_eq!(
        DenseLinear::from_bytes(GgmlType::IQ2_XS, 1, 256, &q(74)).unwrap_err(),
        DenseError::UnsupportedFormat { format: GgmlType::IQ2_XS }
    );
    assert!(matches!(
        DenseLinear::from_bytes(GgmlType::Q8_0, usize::MAX / 2, 64, &q(0)),
        Err(DenseError::Overflow { .. })
    ));
    let w = DenseLinear::from_bytes(GgmlType::Q8_0, 3, 64, &q(3 * 68)).unwrap();
    let mut out = vec![0.0; 6];
    assert_eq!(
        w.forward(&[0.0; 100], 2, &mut out).unwrap_err(),
        DenseError::InputLength { m: 2, cols: 64, expected: 128, got: 100 }
    );
    assert_eq!(
        w.forward(&[0.0; 128], 2, &mut out[..5]).unwrap_err(),
        DenseError::OutputLength { m: 2, rows: 3, expected: 6, got: 5 }
    );
    let mut a = DenseActivations::new();
    a.quantize(ActivationKind::Q8K, &[0.0; 256], 1, 256).unwrap();
    assert!(matches!(w.forward_quantized(&a, &mut out), Err(DenseError::ActivationKind { .. })));
    a.quantize(ActivationKind::Q8Blocks, &[0.0; 96], 1, 96).unwrap();
    assert_eq!(
        w.forward_quantized(&a, &mut out).unwrap_err(),
        DenseError::ActivationWidth { expected: 64, got: 96 }
    );
    assert_eq!(
        a.quantize(ActivationKind::Q8K, &[0.0; 100], 1, 100).unwrap_err(),
        DenseError::ActivationBlock { kind: ActivationKind::Q8K, k: 100, block: 256 }
    );
    assert_eq!(
        w.dequantize_row(3, &mut [0.0; 64]).unwrap_err(),
        DenseError::RowOutOfRange { row: 3, rows: 3 }
    );
    assert_eq!(w.dequantize_row(0, &mut [0.0; 63]).unwrap_err(), DenseError::RowBuffer { cols: 64, got: 63 });
    assert_eq!(w.permute_rows(&[0, 1]).unwrap_err(), DenseError::RowOrder { rows: 3, got: 2 });
    // Errors say what is wrong.
    let msg = DenseLinear::from_bytes(GgmlType::Q4_1, 2, 64, &q(79)).unwrap_err().to_string();
    assert!(msg.contains("Q4_1") && msg.contains("80") && msg.contains("79"), "{msg}");
}

/// With float activations a block format computes `dequantized W · x` in f32: every path,
/// every batch size, equals the decoded rows dotted with `bitnet_core::dense::dot_f32`, bit for
/// bit, and lies within the float bound of the exact f64 product.
#[test]
fn float_activations_run_the_dequantized_rows_on_every_path() {
    let mut rng = Rng::new(0xf10a7);
    for format in DenseFormat::ALL.into_iter().filter(|f| !f.is_float()) {
        for cols in widths(format) {
            for rows in [1, 9, 33] {
                let w =
                    random_matrix(format, rows, cols, Codes::Random, &mut rng).with_float_activations(true);
                assert!(w.float_activations());
                assert_eq!(w.activation_kind(), ActivationKind::F32);
                let dense = w.to_f32();
                for m in [1, 3, 8] {
                    let x = random_inputs(m, cols, Inputs::Random, &mut rng);
                    let mut a = DenseActivations::new();
                    a.quantize(w.activation_kind(), &x, m, cols).unwrap();
                    for path in KernelPath::available() {
                        let mut out = vec![f32::NAN; m * rows];
                        w.forward_quantized_with(path, &a, &mut out).unwrap();
                        for t in 0..m {
                            for r in 0..rows {
                                let (wr, xt) =
                                    (&dense[r * cols..(r + 1) * cols], &x[t * cols..(t + 1) * cols]);
                                let want = bitnet_core::dense::dot_f32(wr, xt);
                                let got = out[t * rows + r];
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{format} {path} m={m} t={t} r={r}"
                                );
                                let exact: f64 =
                                    wr.iter().zip(xt).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                                let bound = bitnet_quant::dense::float_dot_bound(cols, abs_dot(wr, xt));
                                assert!(
                                    (f64::from(got) - exact).abs() <= bound,
                                    "{format} r={r}: {got} vs {exact}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    // A float format ignores the request: it already multiplies floats.
    let f = random_matrix(DenseFormat::BF16, 3, 8, Codes::Random, &mut rng).with_float_activations(true);
    assert!(!f.float_activations());
}

/// A byte source that records the ranges it is asked to release.
struct Recorder {
    bytes: Vec<u8>,
    released: std::sync::Mutex<Vec<std::ops::Range<usize>>>,
}

impl bitnet_quant::ByteSource for Recorder {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    fn release(&self, range: std::ops::Range<usize>) {
        self.released.lock().unwrap().push(range);
    }
}

impl Recorder {
    /// `bytes` after `skip` bytes of padding (so the matrix starts unaligned), as a shared view.
    fn share(bytes: &[u8], skip: usize) -> (std::sync::Arc<Recorder>, bitnet_quant::SharedBytes) {
        let mut all = vec![0xAA; skip];
        all.extend_from_slice(bytes);
        let rec = std::sync::Arc::new(Recorder { bytes: all, released: Default::default() });
        let view = bitnet_quant::SharedBytes::new(rec.clone()).slice(skip..skip + bytes.len()).unwrap();
        (rec, view)
    }

    /// Takes the recorded ranges, checking they are in order and cover exactly `span`.
    fn take_covering(&self, span: std::ops::Range<usize>) -> usize {
        let ranges = std::mem::take(&mut *self.released.lock().unwrap());
        let mut at = span.start;
        for r in &ranges {
            assert_eq!(r.start, at, "releases in order, without gaps: {ranges:?}");
            at = r.end;
        }
        assert_eq!(at, span.end, "releases cover the matrix: {ranges:?}");
        ranges.len()
    }
}

#[test]
fn shared_matrices_read_in_place_and_copies_release_their_source() {
    let mut rng = Rng::new(29);
    for format in DenseFormat::ALL {
        // F32 rows of 1 KiB: 5000 of them are two copy blocks of 4 MiB.
        let (rows, cols) = if format == DenseFormat::F32 { (5000, 256) } else { (37, 512) };
        let owned = random_matrix(format, rows, cols, Codes::Random, &mut rng);
        let (rec, view) = Recorder::share(owned.as_bytes(), 3);
        let shared = DenseLinear::from_shared(format.ggml(), rows, cols, view.clone()).unwrap();
        assert!(shared.is_shared() && !owned.is_shared());
        assert_eq!(shared.as_bytes(), owned.as_bytes());
        // The same products and rows, read in place.
        let x: Vec<f32> = (0..2 * cols).map(|_| unit(&mut rng)).collect();
        let (mut a, mut b) = (vec![0.0; 2 * rows], vec![0.0; 2 * rows]);
        owned.forward(&x, 2, &mut a).unwrap();
        shared.forward(&x, 2, &mut b).unwrap();
        assert_eq!(a, b, "{format}");
        // Reading never releases; release_rows names the rows' bytes.
        let dense = shared.to_dense_matrix();
        assert!(rec.released.lock().unwrap().is_empty());
        shared.release_rows(2..5);
        let rb = shared.row_bytes();
        assert_eq!(rec.take_covering(3 + 2 * rb..3 + 5 * rb), 1);
        owned.release_rows(0..rows); // a matrix with its own bytes ignores the hint
                                     // Consuming copies release the whole source, block by block, and keep the values.
        let copy = shared.clone().into_owned();
        assert!(!copy.is_shared());
        assert_eq!(copy.as_bytes(), owned.as_bytes());
        let blocks = rec.take_covering(3..3 + owned.bytes());
        assert_eq!(blocks, if format == DenseFormat::F32 { 2 } else { 1 }, "{format}");
        let m = shared.into_dense_matrix();
        assert_eq!(m.to_f32(), dense.to_f32());
        assert_eq!(m.to_f32(), owned.to_f32());
        rec.take_covering(3..3 + owned.bytes());
        // A view of the wrong length is refused.
        let short = view.slice(0..view.len() - 1).unwrap();
        assert!(matches!(
            DenseLinear::from_shared(format.ggml(), rows, cols, short),
            Err(DenseError::ByteLength { .. })
        ));
    }
}

/// Ternary tables are kept as stored: rows decode to code × scale, and the product is the f32 dot
/// of the decoded row, on every path.
#[test]
fn ternary_tables_decode_rows_and_multiply_decoded() {
    let mut rng = Rng::new(77);
    for format in DenseFormat::TERNARY {
        assert!(format.is_ternary() && !format.is_float(), "{format}");
        let (rows, cols, m) = (11, 512, 3);
        let w = random_matrix(format, rows, cols, Codes::Random, &mut rng);
        assert_eq!(w.bytes() as u64, format.ggml().tensor_bytes(&[cols as u64, rows as u64]).unwrap());
        let whole = bitnet_quant::formats::dequantize(format.ggml(), w.as_bytes(), rows * cols).unwrap();
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut row).unwrap();
            assert_eq!(row, whole[r * cols..(r + 1) * cols], "{format} row {r}");
        }
        let x = random_inputs(m, cols, Inputs::Random, &mut rng);
        let mut first: Option<Vec<f32>> = None;
        for path in KernelPath::available() {
            let mut out = vec![0.0f32; m * rows];
            w.forward_with(path, &x, m, &mut out).unwrap();
            for t in 0..m {
                for r in 0..rows {
                    let wr = &whole[r * cols..(r + 1) * cols];
                    let want: f32 =
                        wr.iter().zip(&x[t * cols..(t + 1) * cols]).fold(0.0, |a, (&w, &v)| a + w * v);
                    assert_eq!(out[t * rows + r].to_bits(), want.to_bits(), "{format} {path} t{t} r{r}");
                }
            }
            match &first {
                None => first = Some(out),
                Some(f) => assert_eq!(f, &out, "{format} {path}"),
            }
        }
    }
}

/// A rows-in-lanes type against the stored matrices of `format`: decoded rows equal, products
/// equal to the stored scalar reference bit for bit on every path (scalar, AVX2, AVX-512 VNNI
/// where the CPU has them), random and extreme codes and inputs, ragged groups, 1 to 33 tokens.
/// (A macro: the two types share their methods, not a trait this crate exports.)
macro_rules! lanes_equal_stored {
    ($lanes:ty, $format:expr, $rows:expr, $rng:expr) => {
        let paths = [KernelPath::Scalar, KernelPath::Avx2, KernelPath::Avx512Vnni];
        for (codes, inputs) in [
            (Codes::Random, Inputs::Random),
            (Codes::Extreme, Inputs::Extreme),
            (Codes::Symmetric, Inputs::Random),
            (Codes::ExtremeSymmetric, Inputs::Extreme),
        ] {
            for rows in $rows {
                for cols in widths($format) {
                    let w = random_matrix($format, rows, cols, codes, $rng);
                    let lanes = <$lanes>::from_stored(&w).expect("a matrix of the format");
                    assert_eq!((lanes.rows(), lanes.cols()), (rows, cols));
                    let (mut want_row, mut got_row) = (vec![0.0; cols], vec![0.0; cols]);
                    for r in [0, rows / 2, rows - 1] {
                        w.dequantize_row(r, &mut want_row).unwrap();
                        lanes.dequantize_row(r, &mut got_row).unwrap();
                        assert_eq!(got_row, want_row, "row {r} of {rows}×{cols}");
                    }
                    for m in TOKENS {
                        let x = random_inputs(m, cols, inputs, $rng);
                        let mut a = DenseActivations::new();
                        a.quantize(w.activation_kind(), &x, m, cols).unwrap();
                        let mut want = vec![0.0; m * rows];
                        w.forward_quantized_with(KernelPath::Scalar, &a, &mut want).unwrap();
                        for path in paths {
                            let mut got = vec![f32::NAN; m * rows];
                            lanes.forward_quantized_with(path, &a, &mut got).unwrap();
                            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&got),
                                bits(&want),
                                "{path} {rows}×{cols}, {m} tokens, {codes:?}"
                            );
                        }
                    }
                }
            }
        }
    };
}

/// Q8_0 rows-in-lanes ([`Q8Lanes`]): the same outputs as the stored matrix on the scalar
/// reference, bit for bit, on every path (AVX2 and AVX-512 VNNI where the CPU has them), for ragged row
/// counts (a partial last group), random and extreme codes and inputs, 1 to 33 tokens; and the
/// same decoded rows.
#[test]
fn q8_0_rows_in_lanes_equal_the_stored_matrix() {
    let mut rng = Rng::new(41);
    lanes_equal_stored!(Q8Lanes, DenseFormat::Q8_0, [16, 17, 33, 50], &mut rng);
    // One -128 code among codes within ±127, in the last block of the last row, against a
    // negative activation: the AVX2 kernel must see it and take the magnitudes of the codes
    // (negating it in a byte would give -128 · x where 128 · |x| is due).
    let (rows, cols) = (33, 96);
    let stored = random_matrix(DenseFormat::Q8_0, rows, cols, Codes::Symmetric, &mut rng);
    let mut bytes = stored.as_bytes().to_vec();
    let last = bytes.len() - 1;
    bytes[last] = 0x80;
    let w = DenseLinear::from_bytes(DenseFormat::Q8_0.ggml(), rows, cols, &bytes).unwrap();
    let lanes = Q8Lanes::from_stored(&w).unwrap();
    let x: Vec<f32> = (0..cols).map(|c| if c == cols - 1 { -2.5 } else { 0.25 * (c % 7) as f32 }).collect();
    let mut a = DenseActivations::new();
    a.quantize(w.activation_kind(), &x, 1, cols).unwrap();
    let mut want = vec![0.0; rows];
    w.forward_quantized_with(KernelPath::Scalar, &a, &mut want).unwrap();
    for path in [KernelPath::Avx2, KernelPath::Avx512Vnni] {
        let mut got = vec![f32::NAN; rows];
        lanes.forward_quantized_with(path, &a, &mut got).unwrap();
        assert_eq!(got, want, "{path}: a lone -128 code");
    }
    // Bad input: a row out of range, activations of another width or kind, a short output.
    let w = random_matrix(DenseFormat::Q8_0, 20, 64, Codes::Random, &mut rng);
    let lanes = Q8Lanes::from_stored(&w).unwrap();
    assert!(matches!(lanes.dequantize_row(20, &mut [0.0; 64]), Err(DenseError::RowOutOfRange { .. })));
    let mut a = DenseActivations::new();
    a.quantize(ActivationKind::Q8Blocks, &[0.5; 96], 1, 96).unwrap();
    assert!(matches!(lanes.forward_quantized(&a, &mut [0.0; 20]), Err(DenseError::ActivationWidth { .. })));
    a.quantize(ActivationKind::F32, &[0.5; 64], 1, 64).unwrap();
    assert!(matches!(lanes.forward_quantized(&a, &mut [0.0; 20]), Err(DenseError::ActivationKind { .. })));
    a.quantize(ActivationKind::Q8Blocks, &[0.5; 64], 1, 64).unwrap();
    assert!(matches!(lanes.forward_quantized(&a, &mut [0.0; 19]), Err(DenseError::OutputLength { .. })));
    assert!(
        Q8Lanes::from_stored(&random_matrix(DenseFormat::Q4_0, 20, 64, Codes::Random, &mut rng)).is_none()
    );
}

/// Q6_K rows-in-lanes ([`Q6Lanes`]): as for Q8_0, the stored matrix's outputs bit for bit on
/// every path, ragged groups, 1 to 33 tokens, and the same decoded rows.
#[test]
fn q6_k_rows_in_lanes_equal_the_stored_matrix() {
    let mut rng = Rng::new(43);
    lanes_equal_stored!(Q6Lanes, DenseFormat::Q6_K, [16, 17, 40], &mut rng);
    let w = random_matrix(DenseFormat::Q6_K, 20, 256, Codes::Random, &mut rng);
    let lanes = Q6Lanes::from_stored(&w).unwrap();
    assert!(matches!(lanes.dequantize_row(20, &mut [0.0; 256]), Err(DenseError::RowOutOfRange { .. })));
    let mut a = DenseActivations::new();
    a.quantize(ActivationKind::Q8Blocks, &[0.5; 256], 1, 256).unwrap();
    assert!(matches!(lanes.forward_quantized(&a, &mut [0.0; 20]), Err(DenseError::ActivationKind { .. })));
    assert!(
        Q6Lanes::from_stored(&random_matrix(DenseFormat::Q8_0, 20, 64, Codes::Random, &mut rng)).is_none()
    );
}

/// Q4_K rows-in-lanes ([`Q4Lanes`]): as for Q8_0, the stored matrix's outputs bit for bit on
/// every path (the mins' term kept apart and taken off at the end, as the stored product does),
/// ragged groups, 1 to 33 tokens, and the same decoded rows.
#[test]
fn q4_k_rows_in_lanes_equal_the_stored_matrix() {
    let mut rng = Rng::new(47);
    lanes_equal_stored!(Q4Lanes, DenseFormat::Q4_K, [16, 17, 40], &mut rng);
    let w = random_matrix(DenseFormat::Q4_K, 20, 256, Codes::Random, &mut rng);
    let lanes = Q4Lanes::from_stored(&w).unwrap();
    assert!(matches!(lanes.dequantize_row(20, &mut [0.0; 256]), Err(DenseError::RowOutOfRange { .. })));
    let mut a = DenseActivations::new();
    a.quantize(ActivationKind::Q8Blocks, &[0.5; 256], 1, 256).unwrap();
    assert!(matches!(lanes.forward_quantized(&a, &mut [0.0; 20]), Err(DenseError::ActivationKind { .. })));
    assert!(
        Q4Lanes::from_stored(&random_matrix(DenseFormat::Q6_K, 20, 256, Codes::Random, &mut rng)).is_none()
    );
}

/// Q4_0 and Q4_1 rows-in-lanes ([`Q40Lanes`], [`Q41Lanes`]): the stored matrix's outputs bit for
/// bit on every path (Q4_0's `8 Σ x` taken off in i32; Q4_1's `m · s_a` summed apart and added
/// at the end), ragged groups, 1 to 33 tokens, and the same decoded rows.
#[test]
fn q4_0_and_q4_1_rows_in_lanes_equal_the_stored_matrix() {
    let mut rng = Rng::new(53);
    lanes_equal_stored!(Q40Lanes, DenseFormat::Q4_0, [16, 17, 50], &mut rng);
    lanes_equal_stored!(Q41Lanes, DenseFormat::Q4_1, [16, 17, 50], &mut rng);
    let w = random_matrix(DenseFormat::Q4_1, 20, 64, Codes::Random, &mut rng);
    let lanes = Q41Lanes::from_stored(&w).unwrap();
    let mut a = DenseActivations::new();
    a.quantize(ActivationKind::Q8K, &[0.5; 256], 1, 256).unwrap();
    assert!(lanes.forward_quantized(&a, &mut [0.0; 20]).is_err());
    assert!(
        Q40Lanes::from_stored(&random_matrix(DenseFormat::Q4_1, 20, 64, Codes::Random, &mut rng)).is_none()
    );
}
