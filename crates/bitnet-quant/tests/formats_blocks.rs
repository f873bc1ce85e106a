//! Dequantizers against blocks written byte by byte from the documented layouts
//! (`shared/docs/ternary-formats.md`, llama.cpp `ggml-common.h`), not by our quantizers.

use bitnet_quant::formats::{
    dequantize, i2_s, k_quants, q4, q8_0, ternary_codes, tq1_0, tq2_0, FormatError, GgmlType,
};

fn f16(bits: u16) -> [u8; 2] {
    bits.to_le_bytes()
}

#[test]
fn f16_and_bf16_literals() {
    // 1.0, -2.0, +inf, smallest subnormal 2^-24, 65504 (max)
    let bytes = [0x00, 0x3C, 0x00, 0xC0, 0x00, 0x7C, 0x01, 0x00, 0xFF, 0x7B];
    let v = dequantize(GgmlType::F16, &bytes, 5).unwrap();
    assert_eq!(v, vec![1.0, -2.0, f32::INFINITY, 2f32.powi(-24), 65504.0]);
    // bf16: 1.0, 3.140625, -0.0
    let bytes = [0x80, 0x3F, 0x49, 0x40, 0x00, 0x80];
    let v = dequantize(GgmlType::BF16, &bytes, 3).unwrap();
    assert_eq!(v[..2], [1.0, 3.140625]);
    assert!(v[2] == 0.0 && v[2].is_sign_negative());
    let v = dequantize(GgmlType::F32, &[0x00, 0x00, 0x40, 0x3F], 1).unwrap();
    assert_eq!(v, vec![0.75]);
}

#[test]
fn q8_0_literal_block() {
    let mut blk = f16(0x3800).to_vec(); // d = 0.5
    let qs: [i8; 32] = core::array::from_fn(|i| match i {
        0 => -128,
        1 => -1,
        2 => 0,
        3 => 1,
        4 => 127,
        _ => i as i8 - 16,
    });
    blk.extend(qs.iter().map(|&q| q as u8));
    assert_eq!(blk.len(), q8_0::BLOCK_BYTES);
    let v = dequantize(GgmlType::Q8_0, &blk, 32).unwrap();
    for i in 0..32 {
        assert_eq!(v[i], f32::from(qs[i]) * 0.5, "element {i}");
    }
}

#[test]
fn q4_0_and_q4_1_literal_blocks() {
    // byte j: low nibble j, high nibble 15 - j
    let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let mut blk = f16(0x4000).to_vec(); // d = 2
    blk.extend(&qs);
    assert_eq!(blk.len(), q4::Q4_0_BLOCK_BYTES);
    let v = dequantize(GgmlType::Q4_0, &blk, 32).unwrap();
    for j in 0..16 {
        assert_eq!(v[j], (j as f32 - 8.0) * 2.0);
        assert_eq!(v[j + 16], ((15 - j) as f32 - 8.0) * 2.0);
    }
    let mut blk = f16(0x3C00).to_vec(); // d = 1
    blk.extend(f16(0xC400)); // m = -4
    blk.extend(&qs);
    let v = dequantize(GgmlType::Q4_1, &blk, 32).unwrap();
    for j in 0..16 {
        assert_eq!(v[j], j as f32 - 4.0);
        assert_eq!(v[j + 16], (15 - j) as f32 - 4.0);
    }
}

#[test]
fn q4_k_literal_block() {
    // Eight 6-bit scales and mins, packed by hand as get_scale_min_k4 reads them:
    // bytes 0..4: sc[0..4] | (sc[4..8] >> 4) << 6; bytes 4..8: m[0..4] | (m[4..8] >> 4) << 6;
    // bytes 8..12: (sc[4..8] & 15) | (m[4..8] & 15) << 4.
    let sc = [1u8, 2, 3, 4, 17, 33, 49, 63];
    let m = [0u8, 1, 2, 3, 16, 32, 48, 63];
    let scales = [65u8, 130, 195, 196, 64, 129, 194, 195, 1, 1, 1, 255];
    let mut blk = f16(0x3C00).to_vec(); // d = 1
    blk.extend(f16(0x3800)); // dmin = 0.5
    blk.extend(scales);
    for _chunk in 0..4 {
        blk.extend((0..32u8).map(|l| (l % 16) | ((15 - l % 16) << 4)));
    }
    assert_eq!(blk.len(), k_quants::Q4_K_BLOCK_BYTES);
    let v = dequantize(GgmlType::Q4_K, &blk, 256).unwrap();
    for c in 0..4 {
        for l in 0..32 {
            let (s0, s1) = (2 * c, 2 * c + 1);
            let lo = f32::from(sc[s0]) * (l % 16) as f32 - 0.5 * f32::from(m[s0]);
            let hi = f32::from(sc[s1]) * (15 - l % 16) as f32 - 0.5 * f32::from(m[s1]);
            assert_eq!(v[64 * c + l], lo, "chunk {c} low {l}");
            assert_eq!(v[64 * c + 32 + l], hi, "chunk {c} high {l}");
        }
    }
}

#[test]
fn q6_k_block_from_layout() {
    // Element e gets the 6-bit level L(e) = (7 * e + 3) % 64; bytes placed as ggml-common.h
    // documents block_q6_K: ql (low nibbles), qh (2-bit pairs), i8 scales, f16 d.
    let level = |e: usize| ((7 * e + 3) % 64) as u8;
    let scales: [i8; 16] = [1, -1, 2, -2, 3, -3, 127, -128, 5, 6, 7, 8, -9, 10, 0, 4];
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        for l in 0..32 {
            let e = 128 * h + l;
            ql[64 * h + l] = (level(e) & 15) | ((level(e + 64) & 15) << 4);
            ql[64 * h + l + 32] = (level(e + 32) & 15) | ((level(e + 96) & 15) << 4);
            qh[32 * h + l] = (level(e) >> 4)
                | ((level(e + 32) >> 4) << 2)
                | ((level(e + 64) >> 4) << 4)
                | ((level(e + 96) >> 4) << 6);
        }
    }
    let mut blk = ql.to_vec();
    blk.extend(qh);
    blk.extend(scales.iter().map(|&s| s as u8));
    blk.extend(f16(0x3400)); // d = 0.25
    assert_eq!(blk.len(), k_quants::Q6_K_BLOCK_BYTES);
    let v = dequantize(GgmlType::Q6_K, &blk, 256).unwrap();
    for (e, &got) in v.iter().enumerate() {
        // element e of half h, position p: its scale is scales[8h + p/16] (16 weights each)
        let want = 0.25 * f32::from(scales[e / 16]) * (f32::from(level(e)) - 32.0);
        assert_eq!(got, want, "element {e}");
    }
}

#[test]
fn tq2_0_literal_block() {
    // 0x92 = 0b10_01_00_10: n=0 -> code 2 (+1), n=1 -> 0 (-1), n=2 -> 1 (0), n=3 -> 2 (+1).
    let mut blk = vec![0x92u8; 64];
    blk.extend(f16(0x3E00)); // d = 1.5
    assert_eq!(blk.len(), tq2_0::BLOCK_BYTES);
    let v = dequantize(GgmlType::TQ2_0, &blk, 256).unwrap();
    for (e, &got) in v.iter().enumerate() {
        let n = (e % 128) / 32; // element 4j + m + 32n with j in {0, 32}
        let want = [1.5, -1.5, 0.0, 1.5][n];
        assert_eq!(got, want, "element {e}");
    }

    // All zeros (0x55: every field code 1) except byte 33 (j = 32, m = 1):
    // 0x82 = 0b10_00_00_10 -> element 129 +1, 161 -1, 193 -1, 225 +1.
    let mut blk = vec![0x55u8; 64];
    blk[33] = 0x82;
    blk.extend(f16(0x3C00));
    let codes = ternary_codes(GgmlType::TQ2_0, &blk, 256).unwrap();
    for (e, &c) in codes.codes.iter().enumerate() {
        let want = match e {
            129 | 225 => 1,
            161 | 193 => -1,
            _ => 0,
        };
        assert_eq!(c, want, "element {e}");
    }
    assert_eq!(codes.scales, vec![1.0]);
    assert_eq!(codes.block_len, 256);
}

#[test]
fn tq1_0_literal_block() {
    // 128 = ceil(121 * 256 / 243), 121 = 11111 in base 3: five zero weights.
    let mut blk = vec![128u8; 52];
    // qs[5]: trits 2,0,1,2,0 (v = 177 -> byte 187) for elements 5 + 32n.
    blk[5] = 187;
    // qs[40] = qs[32 + 8]: trits 0,2,2,1,0 (v = 75 -> byte 80) for elements 168 + 16n.
    blk[40] = 80;
    // qh[2] = byte 50: trits 2,2,0,1 then the pad trit 0 (v = 219 -> byte 231) for
    // elements 242 + 4n.
    blk[50] = 231;
    blk.extend(f16(0x3800)); // d = 0.5
    assert_eq!(blk.len(), tq1_0::BLOCK_BYTES);
    let want = |e: usize| -> i8 {
        match e {
            5 | 101 => 1,
            37 | 133 => -1,
            168 | 232 => -1,
            184 | 200 => 1,
            242 | 246 => 1,
            250 => -1,
            _ => 0,
        }
    };
    let v = dequantize(GgmlType::TQ1_0, &blk, 256).unwrap();
    let codes = ternary_codes(GgmlType::TQ1_0, &blk, 256).unwrap();
    for (e, (&x, &c)) in v.iter().zip(&codes.codes).enumerate() {
        assert_eq!(x, f32::from(want(e)) * 0.5, "element {e}");
        assert_eq!(c, want(e), "code {e}");
    }
    assert_eq!(codes.scales, vec![0.5]);
}

#[test]
fn i2_s_literal_tensor() {
    // Two 128-weight chunks; 0x55 = codes 1,1,1,1 (all zero weights).
    let mut bytes = vec![0x55u8; 64];
    // chunk 0, byte 3: 0b10_00_01_10 -> element 3 +1, 35 -1, 67 0, 99 +1
    bytes[3] = 0x86;
    // chunk 1, byte 31: 0b00_10_10_00 -> element 159 -1, 191 +1, 223 +1, 255 -1
    bytes[32 + 31] = 0x28;
    bytes.extend(0.75f32.to_le_bytes());
    bytes.extend([0u8; 28]);
    assert_eq!(bytes.len(), i2_s::tensor_bytes(256));
    let want = |e: usize| -> i8 {
        match e {
            3 | 99 | 191 | 223 => 1,
            35 | 159 | 255 => -1,
            _ => 0,
        }
    };
    let v = dequantize(GgmlType::I2_S, &bytes, 256).unwrap();
    let codes = ternary_codes(GgmlType::I2_S, &bytes, 256).unwrap();
    for (e, (&x, &c)) in v.iter().zip(&codes.codes).enumerate() {
        assert_eq!(x, f32::from(want(e)) * 0.75, "element {e}");
        assert_eq!(c, want(e), "code {e}");
    }
    assert_eq!(codes.scales, vec![0.75]);
    assert_eq!(codes.block_len, 256);
    assert_eq!(i2_s::scale(&bytes, 256).unwrap(), 0.75);
}

#[test]
fn code_three_is_rejected_by_extraction() {
    let mut blk = vec![0x55u8; 64];
    blk[0] = 0x57; // field n = 0 of byte 0 holds 3: element 0
    blk.extend(f16(0x3C00));
    // dequantization follows llama.cpp: (3 - 1) * d
    assert_eq!(dequantize(GgmlType::TQ2_0, &blk, 256).unwrap()[0], 2.0);
    assert!(matches!(
        ternary_codes(GgmlType::TQ2_0, &blk, 256),
        Err(FormatError::NotTernary { index: 0, .. })
    ));

    let mut bytes = vec![0x55u8; 32];
    bytes[1] = 0xD5; // top field of byte 1 = 3: element 1
    bytes.extend([0u8; 32]);
    assert!(matches!(
        ternary_codes(GgmlType::I2_S, &bytes, 128),
        Err(FormatError::NotTernary { index: 1, .. })
    ));
}

#[test]
fn wrong_lengths_are_errors() {
    let cases: [(GgmlType, usize, usize); 9] = [
        (GgmlType::Q8_0, 32, 33),
        (GgmlType::Q8_0, 31, 34),
        (GgmlType::Q4_0, 32, 17),
        (GgmlType::Q4_K, 256, 145),
        (GgmlType::Q6_K, 255, 210),
        (GgmlType::TQ1_0, 256, 53),
        (GgmlType::TQ2_0, 512, 66),
        (GgmlType::I2_S, 128, 32),
        (GgmlType::I2_S, 100, 57),
    ];
    for (ty, n, len) in cases {
        let bytes = vec![0u8; len];
        assert!(dequantize(ty, &bytes, n).is_err(), "{ty} n={n} len={len}");
    }
    assert!(matches!(dequantize(GgmlType::IQ2_XXS, &[0u8; 66], 256), Err(FormatError::Unsupported { .. })));
    assert!(tq2_0::pack(&[2i8; 256], &[1.0]).is_err());
    assert!(tq1_0::pack(&[0i8; 256], &[1.0, 2.0]).is_err());
    assert!(i2_s::pack(&[0i8; 100], 1.0).is_err());
}

#[test]
fn tensor_bytes_of_each_dialect_type() {
    assert_eq!(GgmlType::Q8_0.tensor_bytes(&[64, 3]), Some(2 * 3 * 34));
    assert_eq!(GgmlType::Q8_0.tensor_bytes(&[33, 3]), None);
    assert_eq!(GgmlType::TQ2_0.tensor_bytes(&[2560, 10]), Some(10 * 10 * 66));
    assert_eq!(GgmlType::I2_S.tensor_bytes(&[2560, 6912]), Some(2560 * 6912 / 4 + 32));
    // TL2: (ne0-256)*ne1/3*5/8 + 256*ne1/2*4/8, rounded up to 32, + 32
    let tl2 = ((2560 - 256) * 2560 / 3 * 5 / 8 + 256 * 2560 / 2 * 4 / 8u64).next_multiple_of(32) + 32;
    assert_eq!(GgmlType::TL2.tensor_bytes(&[2560, 2560]), Some(tl2));
    assert_eq!(GgmlType::F32.tensor_bytes(&[u64::MAX, 2]), None);
}
