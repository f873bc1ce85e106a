//! The CPU backend's own layouts of dense matrices (Q8_0, Q6_K, Q4_K, Q4_0 and Q4_1 rows-in-lanes
//! on x86) give
//! what the stored matrix gives through the backend's operations: products bit for bit with the
//! scalar reference of the stored layout, lookups equal to the stored rows decoded.

use bitnet_inference::backend::Backend;
use bitnet_inference::cpu::CpuDenseLinear;
use bitnet_inference::CpuBackend;
use bitnet_quant::dense::{DenseActivations, DenseFormat, DenseLinear};
use bitnet_quant::selftest::Rng;
use bitnet_quant::KernelPath;

#[test]
fn lane_layouts_compute_and_look_up_as_stored() {
    let mut rng = Rng::new(7);
    let mut b = CpuBackend::new();
    let cases = [
        (DenseFormat::Q8_0, 37, 96),
        (DenseFormat::Q6_K, 21, 512),
        (DenseFormat::Q4_K, 19, 768),
        (DenseFormat::Q4_0, 23, 160),
        (DenseFormat::Q4_1, 18, 64),
    ];
    for (format, rows, cols) in cases {
        let stored = if matches!(format, DenseFormat::Q4_0 | DenseFormat::Q4_1) {
            // No quantizer here for these: random codes under f16 scales (and mins) of 2^-7
            // (0x2000), block by block.
            let (bb, halves) = (format.block_bytes(), if format == DenseFormat::Q4_1 { 2 } else { 1 });
            let bytes: Vec<u8> = (0..rows * cols / 32 * bb)
                .map(|i| match i % bb {
                    at if at < 2 * halves => [0x00, 0x20][at % 2],
                    _ => rng.next_u64() as u8,
                })
                .collect();
            DenseLinear::from_bytes(format.ggml(), rows, cols, &bytes).unwrap()
        } else {
            let w: Vec<f32> =
                (0..rows * cols).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect();
            DenseLinear::encode(format, &w, rows, cols).unwrap()
        };
        let uploaded = b.upload_dense_linear(stored.clone()).unwrap();
        let x86_simd = cfg!(target_arch = "x86_64") && KernelPath::active() != KernelPath::Scalar;
        assert_eq!(
            !matches!(uploaded, CpuDenseLinear::Stored(_)),
            x86_simd,
            "{format}: laid out rows-in-lanes exactly where an x86 SIMD path runs"
        );
        for m in [1, 5] {
            let x: Vec<f32> = (0..m * cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.01).collect();
            let mut want = vec![0.0; m * rows];
            let mut a = DenseActivations::new();
            a.quantize(stored.activation_kind(), &x, m, cols).unwrap();
            stored.forward_quantized_with(KernelPath::Scalar, &a, &mut want).unwrap();
            let mut input = b.dense_input(m, cols).unwrap();
            let mut got = vec![f32::NAN; m * rows];
            b.dense_linear(&uploaded, &x, 0, m, &mut input, &mut got);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{format}, {m} tokens");
        }
        let ids = [0, rows as u32 / 2, rows as u32 - 1];
        let mut got = vec![0.0; ids.len() * cols];
        b.dense_embedding(&uploaded, &ids, &mut got);
        for (t, &id) in ids.iter().enumerate() {
            let mut want = vec![0.0; cols];
            stored.dequantize_row(id as usize, &mut want).unwrap();
            assert_eq!(&got[t * cols..(t + 1) * cols], &want[..], "{format} row {id}");
        }
    }
}
