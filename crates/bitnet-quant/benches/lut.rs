//! Experiment: a lookup-table GEMV (T-MAC / bitnet.cpp TL1 style) against the engine's
//! `maddubs` GEMV, AVX2 only. Not part of the library: it did not win (see the report in
//! `KERNELS.md` beside Cargo.toml), and it stays here so that the comparison can be re-run.
//!
//! Two ternary weights index one of 9 partial sums `t0·x0 + t1·x1` of an activation pair.
//! Those sums reach ±256, so for exact results each table is 16-bit, kept as a low-byte and a
//! high-byte `pshufb` table; 32 rows' 4-bit indices for one pair of columns share a vector.
//! Per 128 multiply-adds: 3 ops to split the indices, 4 `pshufb`, 4 unpacks and 4 adds,
//! about what the `maddubs` kernel spends, so no gain is expected from the instruction count.
//!
//! `RAYON_NUM_THREADS=1 cargo bench -p bitnet-quant --bench lut`

#[cfg(target_arch = "x86_64")]
mod lut {
    use std::arch::x86_64::*;

    /// Rows per tile: one byte lane per row.
    pub const ROWS: usize = 32;

    /// Weights as 4-bit pair indices: for tile `g` and column pair `p`, byte `j` of
    /// `tile[g][p / 2]` holds row `32g + j`'s index `3·(t[2p] + 1) + (t[2p+1] + 1)` in its low
    /// nibble (even `p`) or high nibble (odd `p`).
    pub struct LutMatrix {
        rows: usize,
        pairs: usize,
        data: Vec<u8>,
    }

    impl LutMatrix {
        pub fn pack(t: &[i8], rows: usize, cols: usize) -> Self {
            let pairs = cols.div_ceil(4) * 2; // an even number of column pairs
            let tiles = rows.div_ceil(ROWS);
            let mut data = vec![0u8; tiles * pairs / 2 * ROWS];
            let code = |r: usize, c: usize| if r < rows && c < cols { t[r * cols + c] + 1 } else { 1 };
            for g in 0..tiles {
                for p in 0..pairs {
                    for j in 0..ROWS {
                        let r = g * ROWS + j;
                        let idx = (3 * code(r, 2 * p) + code(r, 2 * p + 1)) as u8;
                        data[(g * pairs / 2 + p / 2) * ROWS + j] |= idx << (4 * (p % 2));
                    }
                }
            }
            Self { rows, pairs, data }
        }

        /// The per-token tables: for column pair `p`, 32 bytes of low bytes then 32 of high
        /// bytes of the 16 sums (each 16-byte table repeated for both 128-bit lanes).
        pub fn tables(&self, x: &[i8], out: &mut Vec<u8>) {
            out.clear();
            out.resize(self.pairs * 64, 0);
            for p in 0..self.pairs {
                let x0 = x.get(2 * p).copied().unwrap_or(0) as i16;
                let x1 = x.get(2 * p + 1).copied().unwrap_or(0) as i16;
                for idx in 0..9i16 {
                    let v = (idx / 3 - 1) * x0 + (idx % 3 - 1) * x1;
                    for lane in 0..2 {
                        out[p * 64 + lane * 16 + idx as usize] = v as u8;
                        out[p * 64 + 32 + lane * 16 + idx as usize] = (v >> 8) as u8;
                    }
                }
            }
        }

        /// # Safety
        /// The CPU must support AVX2.
        #[target_feature(enable = "avx2")]
        pub unsafe fn gemv(&self, tables: &[u8], out: &mut [i32]) {
            assert!(tables.len() >= self.pairs * 64 && out.len() >= self.rows);
            let nib = _mm256_set1_epi8(0x0F);
            for g in 0..self.rows.div_ceil(ROWS) {
                let w = &self.data[g * self.pairs / 2 * ROWS..];
                let mut acc32 = [_mm256_setzero_si256(); 4];
                let mut q = 0;
                while q < self.pairs / 2 {
                    // At most 64 column pairs (|sum| ≤ 256 each) per i16 accumulation.
                    let end = (q + 32).min(self.pairs / 2);
                    let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for qq in q..end {
                        // SAFETY: `w` holds `pairs / 2` vectors of 32 bytes and `tables`
                        // `pairs` entries of 64 bytes.
                        unsafe {
                            let v = _mm256_loadu_si256(w.as_ptr().add(qq * ROWS).cast());
                            let idx =
                                [_mm256_and_si256(v, nib), _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib)];
                            for (h, &i) in idx.iter().enumerate() {
                                let t = tables.as_ptr().add((2 * qq + h) * 64);
                                let lo = _mm256_shuffle_epi8(_mm256_loadu_si256(t.cast()), i);
                                let hi = _mm256_shuffle_epi8(_mm256_loadu_si256(t.add(32).cast()), i);
                                a = _mm256_add_epi16(a, _mm256_unpacklo_epi8(lo, hi));
                                b = _mm256_add_epi16(b, _mm256_unpackhi_epi8(lo, hi));
                            }
                        }
                    }
                    // a: rows 0..8 and 16..24, b: rows 8..16 and 24..32, as i16.
                    acc32[0] = _mm256_add_epi32(acc32[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)));
                    acc32[1] = _mm256_add_epi32(acc32[1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(b)));
                    acc32[2] =
                        _mm256_add_epi32(acc32[2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(a)));
                    acc32[3] =
                        _mm256_add_epi32(acc32[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(b)));
                    q = end;
                }
                let mut rows = [0i32; ROWS];
                for (k, v) in acc32.iter().enumerate() {
                    // SAFETY: `rows` has room for four vectors of eight.
                    unsafe { _mm256_storeu_si256(rows.as_mut_ptr().add(8 * k).cast(), *v) };
                }
                let r0 = g * ROWS;
                for (j, &v) in rows.iter().enumerate().take(self.rows.saturating_sub(r0)) {
                    out[r0 + j] = v;
                }
            }
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        eprintln!("loadavg: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
        divan::main();
        return;
    }
    eprintln!("the LUT experiment needs AVX2");
}

#[cfg(target_arch = "x86_64")]
#[divan::bench_group(max_time = 2)]
mod gemv {
    use super::lut::LutMatrix;
    use bitnet_quant::selftest::Rng;
    use bitnet_quant::{KernelPath, QuantizedActivations, TernaryMatrix, WeightScale};
    use divan::counter::BytesCount;
    use divan::Bencher;

    const SHAPES: [(usize, usize); 4] = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)];

    fn setup(rows: usize, cols: usize) -> (Vec<i8>, Vec<i8>, QuantizedActivations) {
        let mut rng = Rng::new(rows as u64 * 31 + cols as u64);
        let t: Vec<i8> = (0..rows * cols).map(|_| rng.range(-1, 1) as i8).collect();
        let q: Vec<i8> = (0..cols).map(|_| rng.range(-128, 127) as i8).collect();
        let mut x = QuantizedActivations::new(1, cols);
        x.set_int8(&q, &[1.0], 1).unwrap();
        (t, q, x)
    }

    /// The LUT kernel, single-threaded; checked against the engine's result first.
    #[divan::bench(args = SHAPES)]
    fn lut_pshufb(bencher: Bencher, (rows, cols): (usize, usize)) {
        let (t, q, x) = setup(rows, cols);
        let lut = LutMatrix::pack(&t, rows, cols);
        let engine = TernaryMatrix::from_ternary(&t, rows, cols, WeightScale::Multiply(1.0)).unwrap();
        let (mut want, mut got, mut tables) = (vec![0; rows], vec![0; rows], Vec::new());
        engine.matmul_i32_with(KernelPath::Scalar, &x, &mut want);
        lut.tables(&q, &mut tables);
        // SAFETY: main() checked AVX2.
        unsafe { lut.gemv(&tables, &mut got) };
        assert_eq!(got, want, "LUT GEMV differs from the reference");
        // SAFETY: main() checked AVX2.
        bencher
            .counter(BytesCount::new(rows * cols / 4))
            .bench_local(|| unsafe { lut.gemv(&tables, &mut got) });
    }

    /// Building the tables of one token (once per token, shared by every matrix of its width).
    #[divan::bench(args = [2560, 6912])]
    fn lut_tables(bencher: Bencher, cols: usize) {
        let (t, q, _) = setup(8, cols);
        let lut = LutMatrix::pack(&t, 8, cols);
        let mut tables = Vec::new();
        bencher.bench_local(|| lut.tables(&q, &mut tables));
    }

    /// The engine's AVX2 GEMV, for comparison: run with `RAYON_NUM_THREADS=1` to compare
    /// one thread with one thread.
    #[divan::bench(args = SHAPES)]
    fn maddubs_avx2(bencher: Bencher, (rows, cols): (usize, usize)) {
        let (t, _, x) = setup(rows, cols);
        let w = TernaryMatrix::from_ternary(&t, rows, cols, WeightScale::Multiply(1.0)).unwrap();
        let mut out = vec![0; rows];
        bencher
            .counter(BytesCount::new(rows * cols / 4))
            .bench_local(|| w.matmul_i32_with(KernelPath::Avx2, &x, &mut out));
    }
}
