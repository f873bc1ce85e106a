use super::*;

/// A xorshift stream of floats in ±[2⁻⁶, 2⁶), signs and exponents mixed so that any change in
/// the summation order shows in the low bits.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let unit = (self.0 >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        let exp = ((self.0 >> 8) % 13) as i32 - 6;
        let sign = if self.0 & 1 == 0 { 1.0 } else { -1.0 };
        sign * (1.0 + unit) * 2f32.powi(exp)
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

#[derive(Clone, Copy, Debug)]
enum Format {
    F32,
    Bf16,
    F16,
}

fn matrix(format: Format, w: &[f32], rows: usize, cols: usize) -> DenseMatrix {
    let data = match format {
        Format::F32 => DenseData::F32(w.to_vec()),
        Format::Bf16 => DenseData::Bf16(w.iter().map(|&v| bf16::from_f32(v)).collect()),
        Format::F16 => DenseData::F16(w.iter().map(|&v| f16::from_f32(v)).collect()),
    };
    DenseMatrix { rows, cols, data }
}

/// The AVX2 kernels' order in scalar code: `accs` 8-lane partial sums over `8 · accs` columns
/// by fused multiply-add, then (bf16: `eights`) groups of eight into the first, the partial sums
/// added pairwise, their lanes in order, the last columns one by one.
fn fused_model(w: &[f32], x: &[f32], accs: usize, eights: bool) -> f32 {
    let n = w.len();
    let width = 8 * accs;
    let mut acc = vec![[0.0f32; 8]; accs];
    let mut i = 0;
    while i + width <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                *a = w[i + 8 * j + l].mul_add(x[i + 8 * j + l], *a);
            }
        }
        i += width;
    }
    while eights && i + 8 <= n {
        for (l, a) in acc[0].iter_mut().enumerate() {
            *a = w[i + l].mul_add(x[i + l], *a);
        }
        i += 8;
    }
    let lanes: [f32; 8] = std::array::from_fn(|l| match accs {
        4 => (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]),
        _ => acc[0][l] + acc[1][l],
    });
    let mut s: f32 = lanes.iter().sum();
    for k in i..n {
        s += w[k] * x[k];
    }
    s
}

/// What one token's dot product with row `r` must be on `kernel`, from the scalar definitions.
fn expected(m: &DenseMatrix, kernel: FloatKernel, r: usize, x: &[f32]) -> f32 {
    let mut row = vec![0.0; m.cols];
    m.row_f32(r, &mut row);
    let fused = matches!(kernel, FloatKernel::Avx2 | FloatKernel::Avx512);
    match &m.data {
        DenseData::Bf16(_) if fused => fused_model(&row, x, 4, true),
        DenseData::F16(_) if fused => fused_model(&row, x, 2, false),
        _ => dot_widen(&row, x, |v| v),
    }
}

fn available_kernels() -> Vec<FloatKernel> {
    FloatKernel::ALL.into_iter().filter(|k| k.is_available()).collect()
}

/// Every kernel, every format, ragged widths and 1..=17 tokens: each output is the kernel's
/// scalar definition for that token alone, bit for bit (batch exactness).
#[test]
fn every_kernel_computes_each_token_as_alone_bit_for_bit() {
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    let widths = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 47, 63, 64, 65, 100, 255, 257];
    for format in [Format::F32, Format::Bf16, Format::F16] {
        for &cols in &widths {
            let rows = 1 + cols % 5 * 3;
            let m = matrix(format, &noise.vec(rows * cols), rows, cols);
            let x = noise.vec(17 * cols);
            for kernel in available_kernels() {
                for tokens in 1..=17 {
                    let mut out = vec![f32::NAN; tokens * rows];
                    m.matmul_with(kernel, &x, tokens, &mut out);
                    for t in 0..tokens {
                        let xt = &x[t * cols..(t + 1) * cols];
                        for r in 0..rows {
                            let want = expected(&m, kernel, r, xt);
                            let got = out[t * rows + r];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{format:?} {kernel:?} [{rows}x{cols}] {tokens} tokens, t{t} r{r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Blocks and tasks of rows, all tiles of tokens, one thread or several: the same bits as one
/// token at a time; and AVX-512 gives the AVX2 bits.
#[test]
fn batched_head_shapes_equal_single_tokens() {
    let mut noise = Noise(7);
    let (rows, cols) = (613, 2563);
    for format in [Format::Bf16, Format::F16, Format::F32] {
        let m = matrix(format, &noise.vec(rows * cols), rows, cols);
        let tokens = 13;
        let x = noise.vec(tokens * cols);
        let mut per_kernel = Vec::new();
        for kernel in available_kernels() {
            let mut out = vec![f32::NAN; tokens * rows];
            m.matmul_with(kernel, &x, tokens, &mut out);
            let mut solo = vec![f32::NAN; tokens * rows];
            {
                let _one_thread = crate::threads::SoloGuard::new();
                for t in 0..tokens {
                    let xt = &x[t * cols..(t + 1) * cols];
                    m.matmul_with(kernel, xt, 1, &mut solo[t * rows..(t + 1) * rows]);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&solo), "{format:?} {kernel:?}: batch vs one token at a time");
            per_kernel.push((kernel, bits(&out)));
        }
        let avx = |k| per_kernel.iter().find(|(kernel, _)| *kernel == k).map(|(_, b)| b);
        if let (Some(a2), Some(a512)) = (avx(FloatKernel::Avx2), avx(FloatKernel::Avx512)) {
            assert_eq!(a2, a512, "{format:?}: AVX-512 vs AVX2");
        }
    }
}

/// The products are dot products: within float error of an f64 sum, on every kernel.
#[test]
fn matmul_is_the_dot_product() {
    for &(rows, cols) in &[(1, 1), (3, 7), (5, 33), (300, 130), (17, 2560)] {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let x: Vec<f32> = (0..3 * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
        for format in [Format::Bf16, Format::F16, Format::F32] {
            let m = matrix(format, &w, rows, cols);
            let wide = m.to_f32();
            for kernel in available_kernels() {
                let mut out = vec![0.0; 3 * rows];
                m.matmul_with(kernel, &x, 3, &mut out);
                for t in 0..3 {
                    for r in 0..rows {
                        let want: f64 =
                            (0..cols).map(|c| wide[r * cols + c] as f64 * x[t * cols + c] as f64).sum();
                        let got = out[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{format:?} {kernel:?} [{rows}x{cols}] t{t} r{r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_fastest_kernel_is_available() {
    assert!(FloatKernel::best().is_available());
    assert!(FloatKernel::Portable.is_available());
}
