//! Round-trip properties of the block formats: pack -> extract is the identity on ternary
//! codes, quantize -> dequantize stays within each format's error bound.

use bitnet_quant::formats::{dequantize, float, i2_s, quantize, ternary_codes, tq1_0, tq2_0, GgmlType};
use proptest::prelude::*;

fn codes(n: usize) -> impl Strategy<Value = Vec<i8>> {
    prop::collection::vec(-1i8..=1, n)
}

/// A scale that f16 holds exactly, so TQ round trips are exact.
fn f16_scale() -> impl Strategy<Value = f32> {
    (0x0400u16..0x7BFF).prop_map(float::f16_bits_to_f32)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn tq2_0_pack_extract(blocks in 1usize..5, seed in any::<u64>(), s in f16_scale()) {
        let n = blocks * 256;
        let c: Vec<i8> = (0..n).map(|i| ((seed.rotate_left(i as u32 % 64) ^ i as u64) % 3) as i8 - 1).collect();
        let scales = vec![s; blocks];
        let bytes = tq2_0::pack(&c, &scales).unwrap();
        prop_assert_eq!(bytes.len(), GgmlType::TQ2_0.tensor_bytes(&[n as u64]).unwrap() as usize);
        let t = ternary_codes(GgmlType::TQ2_0, &bytes, n).unwrap();
        prop_assert_eq!(&t.codes, &c);
        prop_assert_eq!(&t.scales, &scales);
        let v = dequantize(GgmlType::TQ2_0, &bytes, n).unwrap();
        prop_assert_eq!(v, t.dequantize());
    }

    #[test]
    fn tq1_0_pack_extract(c in codes(512), s0 in f16_scale(), s1 in f16_scale()) {
        let bytes = tq1_0::pack(&c, &[s0, s1]).unwrap();
        prop_assert_eq!(bytes.len(), 2 * 54);
        let t = ternary_codes(GgmlType::TQ1_0, &bytes, 512).unwrap();
        prop_assert_eq!(&t.codes, &c);
        prop_assert_eq!(t.scales, vec![s0, s1]);
        let v = dequantize(GgmlType::TQ1_0, &bytes, 512).unwrap();
        for (i, (&x, &ci)) in v.iter().zip(&c).enumerate() {
            prop_assert_eq!(x, f32::from(ci) * if i < 256 { s0 } else { s1 });
        }
    }

    #[test]
    fn i2_s_pack_extract(c in codes(384), s in -10.0f32..10.0) {
        let bytes = i2_s::pack(&c, s).unwrap();
        prop_assert_eq!(bytes.len(), 384 / 4 + 32);
        let t = ternary_codes(GgmlType::I2_S, &bytes, 384).unwrap();
        prop_assert_eq!(&t.codes, &c);
        prop_assert_eq!(&t.scales, &vec![s]);
        prop_assert_eq!(t.block_len, 384);
        let v = dequantize(GgmlType::I2_S, &bytes, 384).unwrap();
        prop_assert_eq!(v, t.dequantize());
    }

    /// Weights that are already ternary times a scale quantize without loss.
    #[test]
    fn ternary_weights_quantize_exactly(c in codes(256), s in f16_scale()) {
        prop_assume!(c.iter().any(|&x| x != 0));
        let x: Vec<f32> = c.iter().map(|&ci| f32::from(ci) * s).collect();
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0, GgmlType::I2_S] {
            let bytes = quantize(ty, &x).unwrap();
            prop_assert_eq!(dequantize(ty, &bytes, 256).unwrap(), x.clone(), "{}", ty);
            prop_assert_eq!(&ternary_codes(ty, &bytes, 256).unwrap().codes, &c);
        }
    }

    /// Rounding to the nearest ternary level: each weight lands within half a step of d.
    #[test]
    fn tq_quantize_error_bound(x in prop::collection::vec(-3.0f32..3.0, 256)) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let y = dequantize(ty, &quantize(ty, &x).unwrap(), 256).unwrap();
            for (a, b) in x.iter().zip(&y) {
                prop_assert!((a - b).abs() <= amax * 0.5 + amax * 1e-3 + 1e-6, "{ty}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn q8_0_error_bound(x in prop::collection::vec(-100.0f32..100.0, 96)) {
        let y = dequantize(GgmlType::Q8_0, &quantize(GgmlType::Q8_0, &x).unwrap(), 96).unwrap();
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in xb.iter().zip(yb) {
                // half a step, plus the f16 rounding of d times at most 127 steps
                prop_assert!((a - b).abs() <= amax / 127.0 * 0.5 + amax * 1e-3 + 1e-6, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn q6_k_error_bound(x in prop::collection::vec(-1.0f32..1.0, 512), big in 0usize..512) {
        let mut x = x;
        x[big] *= 50.0; // an outlier so the sub-block scales differ a lot
        let y = dequantize(GgmlType::Q6_K, &quantize(GgmlType::Q6_K, &x).unwrap(), 512).unwrap();
        for (xb, yb) in x.chunks(256).zip(y.chunks(256)) {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (sub_x, sub_y) in xb.chunks(16).zip(yb.chunks(16)) {
                let sub_max = sub_x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (a, b) in sub_x.iter().zip(sub_y) {
                    // half a 6-bit step of the sub-block, plus what the 8-bit rounding of the
                    // sub-block scale (step amax/32/128) costs over 32 levels
                    let bound = sub_max / 31.0 + amax / 128.0 + 1e-6;
                    prop_assert!((a - b).abs() <= bound, "{a} vs {b} (bound {bound})");
                }
            }
        }
    }

    #[test]
    fn q4_k_error_bound(x in prop::collection::vec(-1.0f32..1.0, 512), big in 0usize..512, shift in -0.5f32..0.5) {
        let mut x = x;
        x[big] *= 50.0; // an outlier so the sub-block scales differ a lot
        x.iter_mut().for_each(|v| *v += shift); // off-centre sub-blocks need their mins
        let y = dequantize(GgmlType::Q4_K, &quantize(GgmlType::Q4_K, &x).unwrap(), 512).unwrap();
        for (xb, yb) in x.chunks(256).zip(y.chunks(256)) {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (sub_x, sub_y) in xb.chunks(32).zip(yb.chunks(32)) {
                let lo = sub_x.iter().fold(0.0f32, |m, &v| m.min(v));
                let hi = sub_x.iter().fold(0.0f32, |m, &v| m.max(v));
                for (a, b) in sub_x.iter().zip(sub_y) {
                    // a 4-bit step of the sub-block's span (the fit may trade half a step at the
                    // ends for the middle), plus the 6-bit rounding of its scale and min against
                    // the super-block's largest (steps up to amax/63 each, over 15 levels)
                    let bound = (hi - lo) / 15.0 + 2.0 * amax / 63.0 + 1e-6;
                    prop_assert!((a - b).abs() <= bound, "{a} vs {b} (bound {bound})");
                }
            }
        }
    }

    #[test]
    fn f16_bf16_round_trip(bits in any::<u16>()) {
        let v = float::f16_bits_to_f32(bits);
        if !v.is_nan() {
            prop_assert_eq!(float::f32_to_f16_bits(v), bits);
        }
        let w = float::bf16_bits_to_f32(bits);
        if !w.is_nan() {
            prop_assert_eq!(float::f32_to_bf16_bits(w), bits);
        }
    }
}

#[test]
fn all_zero_blocks() {
    let x = vec![0.0f32; 256];
    for ty in
        [GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::Q4_K, GgmlType::TQ1_0, GgmlType::TQ2_0, GgmlType::I2_S]
    {
        let y = dequantize(ty, &quantize(ty, &x).unwrap(), 256).unwrap();
        assert_eq!(y, x, "{ty}");
    }
}

#[test]
fn non_finite_input_does_not_panic() {
    let mut x = vec![1.0f32; 256];
    x[0] = f32::NAN;
    x[1] = f32::INFINITY;
    x[2] = f32::NEG_INFINITY;
    for ty in
        [GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::Q4_K, GgmlType::TQ1_0, GgmlType::TQ2_0, GgmlType::I2_S]
    {
        let bytes = quantize(ty, &x).unwrap();
        let _ = dequantize(ty, &bytes, 256).unwrap();
    }
}
