//! Times `gemm_i16_i8` on the 16-bit backward's shapes of the `small` training preset (batch
//! 16 × 256 tokens): `cargo run --release -p bitnet-quant --example bench_int16 [THREADS]`.
//! Prints the median of 7 runs and the rate in multiply-adds per second.

use std::time::Instant;

use bitnet_quant::int16::{gemm_i16_i8, ALayout, I16Rows, PackedPairs, ScaledOut};

fn main() {
    let threads: usize =
        std::env::args().nth(1).map(|t| t.parse().expect("THREADS is a number")).unwrap_or(1);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("one pool");
    let tokens: usize = std::env::var("TOKENS").map(|t| t.parse().unwrap()).unwrap_or(4096);
    // (name, out features, in features) of the small preset's fused BitLinears.
    let mut layers = vec![("qkv", 512, 256), ("o", 256, 256), ("gate_up", 2048, 256), ("down", 256, 1024)];
    if let Ok(extra) = std::env::var("SHAPES") {
        layers = extra
            .split(',')
            .map(|s| {
                let (o, i) = s.split_once('x').expect("SHAPES is OUTxIN,...");
                ("custom", o.parse().unwrap(), i.parse().unwrap())
            })
            .collect();
    }
    let mut seed = 1u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut total = (0.0, 0.0);
    for (name, n_out, n_in) in layers {
        // dX = dY[tokens, out] · W[out, in] (rows of dY), dW = dYᵀ[out, tokens] · X[tokens, in].
        for (kind, m, k, n, layout) in [
            ("dX", tokens, n_out, n_in, ALayout::RowMajor { lda: n_out }),
            ("dW", n_out, tokens, n_in, ALayout::PairInterleaved { ld: n_out }),
        ] {
            let a: Vec<i16> = (0..m * k).map(|_| (next() % 65535) as i16).collect();
            let b: Vec<i8> = (0..k * n)
                .map(|_| if kind == "dX" { (next() % 3) as i8 - 1 } else { (next() % 255) as i8 })
                .collect();
            let packed = PackedPairs::from_i8(&b, k, n).unwrap();
            let scale = vec![1e-3f32; m];
            let mut out = vec![0f32; m * n];
            let mut times = Vec::new();
            for _ in 0..7 {
                let t = Instant::now();
                let rows = I16Rows { data: &a, m, layout };
                let o = ScaledOut { out: &mut out, ldo: n, row_scale: &scale, accumulate: false };
                gemm_i16_i8(rows, &packed, o).unwrap();
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let s = times[3];
            let macs = (m * k * n) as f64;
            total.0 += s;
            total.1 += macs;
            println!(
                "{name:8} {kind} m={m:5} k={k:5} n={n:4}: {:7.2} ms {:6.1} GMAC/s",
                s * 1e3,
                macs / s / 1e9
            );
        }
    }
    println!(
        "one layer: {:.1} ms, {:.1} GMAC/s; × 4 layers = {:.0} ms",
        total.0 * 1e3,
        total.1 / total.0 / 1e9,
        total.0 * 4e3
    );
}
