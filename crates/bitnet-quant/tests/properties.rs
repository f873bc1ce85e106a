//! Property tests: packings round-trip, quantizers keep their invariants.

use bitnet_quant::hf_pack::{check_packed, pack_hf, unpack_hf, unpack_rows};
use bitnet_quant::quantize::{quantize_symmetric, symmetric_qmax, Granularity, SymmetricQuant};
use bitnet_quant::{
    absmean_ternary, quantize_activation_row, GroupScaleRows, TernaryCodes, TernaryMatrix, WeightScale,
};
use proptest::prelude::*;

/// A ternary matrix `(codes, rows, cols)` with `rows` a multiple of `row_multiple`.
fn ternary(row_multiple: usize) -> impl Strategy<Value = (Vec<i8>, usize, usize)> {
    (1usize..12, 0usize..300).prop_flat_map(move |(r, cols)| {
        let rows = r * row_multiple;
        (prop::collection::vec(-1i8..=1, rows * cols), Just(rows), Just(cols))
    })
}

fn floats(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            4 => -10.0f32..10.0,
            1 => -1e-3f32..1e-3,
            1 => Just(0.0f32),
            1 => prop::sample::select(vec![0.5f32, -0.5, 1.5, -2.5, 1e4, -3e4]),
        ],
        0..max_len,
    )
}

fn bits() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![1u8, 2, 4, 8])
}

/// `(values, granularity)` with a row length that divides the values.
fn grouped() -> impl Strategy<Value = (Vec<f32>, Granularity)> {
    (1usize..40, 1usize..8).prop_flat_map(|(cols, rows)| {
        (
            prop::collection::vec(-100.0f32..100.0, rows * cols),
            prop::sample::select(vec![Granularity::PerTensor, Granularity::PerRow { cols }]),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn hf_packing_round_trips((t, rows, cols) in ternary(4)) {
        let packed = pack_hf(&t, rows, cols).unwrap();
        prop_assert_eq!(packed.len(), rows / 4 * cols);
        prop_assert_eq!(unpack_hf(&packed, rows, cols).unwrap(), t.clone());
        // Any run of rows unpacks alone to the same codes, and repacks by blocks the same.
        check_packed(&packed, rows, cols).unwrap();
        let (first, n) = (rows / 3, rows - rows / 3 - rows / 4);
        let mut part = vec![7i8; n * cols];
        unpack_rows(&packed, rows, cols, first, &mut part);
        prop_assert_eq!(&part[..], &t[first * cols..(first + n) * cols]);
        let by_rows = TernaryMatrix::from_row_blocks(rows, cols, WeightScale::Multiply(1.0), |first, codes| {
            unpack_rows(&packed, rows, cols, first, codes);
            Ok::<(), bitnet_quant::QuantError>(())
        })
        .unwrap();
        prop_assert_eq!(by_rows.to_ternary(), t);
    }

    #[test]
    fn engine_layout_round_trips((t, rows, cols) in ternary(1)) {
        let m = TernaryMatrix::from_ternary(&t, rows, cols, WeightScale::Multiply(1.0)).unwrap();
        prop_assert_eq!(m.to_ternary(), t.clone());
        prop_assert_eq!(m.bytes(), rows.div_ceil(8) * 8 * cols.div_ceil(256) * 64);
        // The layout-neutral form a device backend receives, with and without block scales.
        let c = m.to_codes();
        prop_assert_eq!((c.rows, c.cols, &c.codes, c.scale), (rows, cols, &t, WeightScale::Multiply(1.0)));
        prop_assert_eq!(TernaryMatrix::from_codes(&c).unwrap().to_ternary(), t.clone());
        let d: Vec<f32> = (0..rows * cols.div_ceil(256)).map(|i| 0.5 + i as f32).collect();
        let scaled = TernaryCodes {
            group_scales: Some(GroupScaleRows { group: 256, scales: d }),
            scale: WeightScale::Divide(2.0),
            ..c
        };
        prop_assert_eq!(&TernaryMatrix::from_codes(&scaled).unwrap().to_codes(), &scaled);
        let d: Vec<f32> = (0..rows * cols.div_ceil(64)).map(|i| 0.25 + i as f32).collect();
        let grouped = TernaryCodes { group_scales: Some(GroupScaleRows { group: 64, scales: d }), ..scaled };
        prop_assert_eq!(&TernaryMatrix::from_codes(&grouped).unwrap().to_codes(), &grouped);
    }

    #[test]
    fn absmean_ternary_invariants(w in floats(200)) {
        let (t, m) = absmean_ternary(&w);
        prop_assert!(t.iter().all(|&v| (-1..=1).contains(&v)));
        prop_assert!(m >= 1e-5);
        // Idempotent: the dequantized matrix ternarizes to the same codes.
        let w2: Vec<f32> = t.iter().map(|&v| v as f32 * m).collect();
        let (t2, _) = absmean_ternary(&w2);
        if t.iter().any(|&v| v != 0) {
            prop_assert_eq!(t2, t);
        }
    }

    #[test]
    fn activation_quantizer_invariants(x in floats(300)) {
        let mut q = vec![0i8; x.len()];
        let s = quantize_activation_row(&x, &mut q);
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        prop_assert_eq!(s, 127.0 / amax.max(1e-5));
        for (&qi, &xi) in q.iter().zip(&x) {
            // Symmetric scale: never -128; within half a step of x·s.
            prop_assert!(qi > -128);
            prop_assert_eq!(qi as f32, (xi * s).round_ties_even().clamp(-128.0, 127.0));
        }
        if amax >= 1e-5 {
            prop_assert!(q.iter().any(|&v| v.unsigned_abs() == 127));
            // Idempotent on its own dequantized output.
            let xd: Vec<f32> = q.iter().map(|&v| v as f32 / s).collect();
            let mut q2 = vec![0i8; x.len()];
            let s2 = quantize_activation_row(&xd, &mut q2);
            prop_assert_eq!(&q2, &q);
            prop_assert!((s2 - s).abs() <= s * 1e-6);
        }
    }

    #[test]
    fn symmetric_quantizer_invariants(bits in bits(), (x, g) in grouped()) {
        let q = quantize_symmetric(&x, bits, g).unwrap();
        let qmax = symmetric_qmax(bits);
        let group = match g { Granularity::PerTensor => x.len(), Granularity::PerRow { cols } => cols };
        prop_assert_eq!(q.scales.len(), x.len() / group);
        for (i, (&v, &xi)) in q.values.iter().zip(&x).enumerate() {
            let s = q.scales[i / group];
            if bits == 1 {
                prop_assert_eq!(v, if xi >= 0.0 { 1 } else { -1 });
            } else {
                prop_assert!((-qmax..=qmax).contains(&v));
                // Within half a step (plus rounding of the scale).
                prop_assert!((v as f32 * s - xi).abs() <= s * 0.5 * (1.0 + 1e-5) + 1e-6);
            }
        }
        for (r, xs) in x.chunks(group).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mean = (xs.iter().map(|v| v.abs() as f64).sum::<f64>() / xs.len() as f64) as f32;
            let want = if bits == 1 { mean } else { amax.max(1e-5) / qmax as f32 };
            prop_assert_eq!(q.scales[r], want);
        }
        // Idempotent on already-quantized data.
        let again: SymmetricQuant = quantize_symmetric(&q.dequantize(), bits, g).unwrap();
        prop_assert_eq!(&again.values, &q.values);
        for (a, b) in again.scales.iter().zip(&q.scales) {
            prop_assert!((a - b).abs() <= b * 1e-5);
        }
    }
}

#[test]
fn hf_pack_matches_the_transformers_docstring_vector() {
    // bitnet-reference.md §2.4.
    let w: [i8; 16] = [0, -1, -1, 1, -1, 1, -1, 1, 1, 0, 0, -1, 1, -1, 1, -1];
    let packed = pack_hf(&w, 8, 2).unwrap();
    assert_eq!(packed, [0b1010_0001, 0b0001_1000, 0b1001_0000, 0b0000_1010]);
    assert_eq!(unpack_hf(&packed, 8, 2).unwrap(), w);
    assert!(unpack_hf(&[0b11], 4, 1).is_err());
    assert!(pack_hf(&[0; 6], 3, 2).is_err());
}
