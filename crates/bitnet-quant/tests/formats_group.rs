//! The group-scaled ternary formats (Q1_0, Q2_0, PQ2_0, PTQ1_0) against blocks written byte by
//! byte from the documented layouts (docs/ternary-formats.md, from ggml-common.h and
//! ggml-quants.c), not by our packers; then their packers and quantizers.

use bitnet_quant::formats::{dequantize, pack_ternary, quantize, ternary_codes, FormatError, GgmlType};

fn f16(bits: u16) -> [u8; 2] {
    bits.to_le_bytes()
}

/// Dequantized values and codes of one block equal `want(e) · d` and `want(e)`.
fn check_block(format: GgmlType, blk: &[u8], n: usize, d: f32, want: impl Fn(usize) -> i8) {
    assert_eq!(format.tensor_bytes(&[n as u64]), Some(blk.len() as u64), "{format} block size");
    let v = dequantize(format, blk, n).unwrap();
    let codes = ternary_codes(format, blk, n).unwrap();
    for (e, (&x, &c)) in v.iter().zip(&codes.codes).enumerate() {
        assert_eq!(x, f32::from(want(e)) * d, "{format} element {e}");
        assert_eq!(c, want(e), "{format} code {e}");
    }
    assert_eq!(codes.scales, vec![d]);
    assert_eq!(codes.block_len, n);
    // Our packer writes the same bytes back.
    assert_eq!(pack_ternary(format, &codes.codes, &codes.scales).unwrap(), blk, "{format} pack");
}

#[test]
fn q1_0_literal_block() {
    // d first, then 16 bytes of sign bits, bit j % 8 of byte j / 8; 1 is +d, 0 is -d.
    let mut blk = f16(0x3800).to_vec(); // d = 0.5
    let mut qs = [0u8; 16];
    qs[0] = 0b0000_0101; // elements 0 and 2 positive
    qs[9] = 0b0100_0000; // element 78
    qs[15] = 0x80; // element 127
    blk.extend(qs);
    check_block(GgmlType::Q1_0, &blk, 128, 0.5, |e| if matches!(e, 0 | 2 | 78 | 127) { 1 } else { -1 });
}

#[test]
fn q2_0_and_pq2_0_literal_blocks() {
    // d first, then 2-bit codes, element j in bits 2(j % 4) of byte j / 4; code q is (q - 1)·d.
    for (format, n) in [(GgmlType::Q2_0, 64), (GgmlType::PQ2_0, 128)] {
        let mut blk = f16(0x4000).to_vec(); // d = 2
        let mut qs = vec![0x55u8; n / 4]; // codes 1: zeros
        qs[0] = 0b10_01_00_10; // elements 0: +1, 1: -1, 2: 0, 3: +1
        qs[n / 4 - 1] = 0b00_01_01_01; // last element: -1
        qs[5] = 0b01_10_01_01; // element 22: +1
        blk.extend(&qs);
        check_block(format, &blk, n, 2.0, |e| match e {
            0 | 3 | 22 => 1,
            1 => -1,
            e if e == n - 1 => -1,
            _ => 0,
        });
    }
}

#[test]
fn ptq1_0_literal_block() {
    // qs[24] in a stage of 16 bytes (elements m + 16n) and one of 8 (80 + m + 8n), qh[2]
    // (120 + h + 2n), then d. 128 = ceil(121 · 256 / 243), 121 = 11111 in base 3: zeros; in
    // qh the fifth trit is padding, 0: 127 = ceil(120 · 256 / 243).
    let mut blk = vec![128u8; 26];
    blk[24] = 127;
    blk[3] = 187; // trits 2,0,1,2,0 (v = 177): elements 3 + 16n
    blk[16 + 5] = 80; // trits 0,2,2,1,0 (v = 75): elements 85 + 8n
    blk[24 + 1] = 231; // trits 2,2,0,1 and the pad trit (v = 219): elements 121 + 2n
    blk.extend(f16(0x3800)); // d = 0.5
    check_block(GgmlType::PTQ1_0, &blk, 128, 0.5, |e| match e {
        3 | 51 => 1,
        19 | 67 => -1,
        93 | 101 => 1,
        85 | 117 => -1,
        121 | 123 => 1,
        125 => -1,
        _ => 0,
    });
}

#[test]
fn q2_0_code_three_dequantizes_to_two_d_and_is_not_ternary() {
    let mut blk = f16(0x3C00).to_vec();
    let mut qs = [0x55u8; 16];
    qs[2] = 0b01_11_01_01; // element 10 holds code 3
    blk.extend(qs);
    assert_eq!(dequantize(GgmlType::Q2_0, &blk, 64).unwrap()[10], 2.0);
    assert!(matches!(
        ternary_codes(GgmlType::Q2_0, &blk, 64),
        Err(FormatError::NotTernary { index: 10, code: 2, .. })
    ));
}

#[test]
fn q1_0_cannot_hold_a_zero() {
    let mut codes = vec![1i8; 256];
    codes[130] = 0;
    let err = pack_ternary(GgmlType::Q1_0, &codes, &[1.0, 1.0]).unwrap_err();
    assert!(matches!(err, FormatError::NotSign { index: 130, .. }), "{err}");
    assert!(err.to_string().contains("no zero"), "{err}");
}

#[test]
fn reference_quantizers() {
    // Q1_0: d = mean |x| of the block (f16), the sign of each element with 0 counted as +.
    let x: Vec<f32> = (0..128).map(|i| if i % 3 == 0 { 0.0 } else { (i as f32 - 60.0) * 0.01 }).collect();
    let bytes = quantize(GgmlType::Q1_0, &x).unwrap();
    let t = ternary_codes(GgmlType::Q1_0, &bytes, 128).unwrap();
    let mean = x.iter().fold(0.0f32, |s, v| s + v.abs()) / 128.0;
    assert_eq!(t.scales[0], half::f16::from_f32(mean).to_f32());
    for (i, (&c, &v)) in t.codes.iter().zip(&x).enumerate() {
        assert_eq!(c, if v >= 0.0 { 1 } else { -1 }, "element {i}");
    }
    // Q2_0 / PQ2_0 / PTQ1_0: d = max |x|, round(x / d) with ties away from zero.
    for (format, n) in [(GgmlType::Q2_0, 64), (GgmlType::PQ2_0, 128), (GgmlType::PTQ1_0, 128)] {
        let mut x = vec![0.0f32; 2 * n];
        x[0] = 4.0; // d of block 0
        x[1] = 2.0; // x / d = 0.5: rounds to 1
        x[2] = -1.9; // -0.475: 0
        x[3] = -2.0; // -0.5: -1
        x[n] = -0.25; // d of block 1 (|x|)
        x[n + 1] = 0.1; // 0.4: 0
        let bytes = quantize(format, &x).unwrap();
        let t = ternary_codes(format, &bytes, 2 * n).unwrap();
        assert_eq!(t.scales, vec![4.0, 0.25], "{format}");
        assert_eq!(&t.codes[..4], &[1, 1, 0, -1], "{format}");
        assert_eq!(&t.codes[n..n + 2], &[-1, 0], "{format}");
        assert!(t.codes[4..n].iter().chain(&t.codes[n + 2..]).all(|&c| c == 0), "{format}");
    }
}
