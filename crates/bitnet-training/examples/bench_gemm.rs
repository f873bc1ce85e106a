//! Times the dense products of one `small`-preset step through `linalg::matmul`:
//! `cargo run --release -p bitnet-training --example bench_gemm -- [threads]`.

use std::time::Instant;

use bitnet_training::linalg::{matmul, Operand};

fn time(name: &str, m: usize, k: usize, n: usize, mut f: impl FnMut()) {
    f();
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{name} m={m} k={k} n={n}: {:.2} ms, {:.1} GFLOP/s",
        s * 1e3,
        2.0 * (m * n * k) as f64 / s / 1e9
    );
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        for &(m, k, n) in
            &[(4096usize, 256usize, 512usize), (4096, 256, 1600), (4096, 800, 256), (4096, 256, 4096)]
        {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 3) as f32 - 1.0).collect();
            let dy: Vec<f32> = (0..m * n).map(|i| ((i % 5) as f32 - 2.0) * 0.1).collect();
            let mut c = vec![0.0f32; m * n];
            let mut dx = vec![0.0f32; m * k];
            let mut dw = vec![0.0f32; n * k];
            time("x·Wᵀ ", m, k, n, || {
                matmul(&mut c, Operand::n(&a, m, k), Operand::t(&w, n, k), false, true)
            });
            time("dy·W ", m, k, n, || {
                matmul(&mut dx, Operand::n(&dy, m, n), Operand::n(&w, n, k), true, true)
            });
            time("dyᵀ·x", m, k, n, || {
                matmul(&mut dw, Operand::t(&dy, m, n), Operand::n(&a, m, k), true, true)
            });
        }
        // The head on one chunk of 512 rows: logits, dx = dlogits·head, dhead += dlogitsᵀ·x.
        let (rows, hidden, vocab) = (512usize, 256usize, 4096usize);
        let x: Vec<f32> = (0..rows * hidden).map(|i| (i % 7) as f32 - 3.0).collect();
        let head: Vec<f32> = (0..vocab * hidden).map(|i| (i % 3) as f32 - 1.0).collect();
        let mut logits = vec![0.0f32; rows * vocab];
        let mut dx = vec![0.0f32; rows * hidden];
        let mut dhead = vec![0.0f32; vocab * hidden];
        time("head x·Eᵀ ", rows, hidden, vocab, || {
            matmul(&mut logits, Operand::n(&x, rows, hidden), Operand::t(&head, vocab, hidden), false, true)
        });
        time("head dl·E ", rows, vocab, hidden, || {
            matmul(&mut dx, Operand::n(&logits, rows, vocab), Operand::n(&head, vocab, hidden), false, true)
        });
        time("head dlᵀ·x", vocab, rows, hidden, || {
            matmul(&mut dhead, Operand::t(&logits, rows, vocab), Operand::n(&x, rows, hidden), true, true)
        });
    });
}
