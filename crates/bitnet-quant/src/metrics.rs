//! Error metrics between a reference signal and its approximation (e.g. float weights and
//! their dequantized form). All sums run in f64.

/// Mean squared error `Σ (a - b)² / n` (0 for empty inputs). Panics if the lengths differ.
pub fn mse(reference: &[f32], approx: &[f32]) -> f64 {
    assert_eq!(reference.len(), approx.len(), "mse of slices of different lengths");
    if reference.is_empty() {
        return 0.0;
    }
    squared_error(reference, approx) / reference.len() as f64
}

/// Signal-to-quantization-noise ratio in dB: `10 · log10(Σ a² / Σ (a - b)²)`.
/// `+inf` when the approximation is exact, `-inf` when the reference is all zero and the
/// approximation is not. Panics if the lengths differ.
pub fn sqnr_db(reference: &[f32], approx: &[f32]) -> f64 {
    assert_eq!(reference.len(), approx.len(), "sqnr of slices of different lengths");
    let signal: f64 = reference.iter().map(|&a| (a as f64).powi(2)).sum();
    let noise = squared_error(reference, approx);
    if noise == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (signal / noise).log10()
}

/// Cosine similarity `a·b / (|a| |b|)`: 1 for parallel vectors; 1 when both are all zero and
/// 0 when only one is. Panics if the lengths differ.
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine of slices of different lengths");
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    match (aa == 0.0, bb == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => ab / (aa.sqrt() * bb.sqrt()),
    }
}

fn squared_error(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [1.0f32, 2.0, 3.0, 5.0];
        assert_eq!(mse(&a, &b), 0.25);
        // 10·log10(30 / 1)
        assert!((sqnr_db(&a, &b) - 14.771212547196624).abs() < 1e-12);
        assert_eq!(sqnr_db(&a, &a), f64::INFINITY);
        assert!((cosine_similarity(&a, &a) - 1.0).abs() < 1e-15);
        assert!((cosine_similarity(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-15);
        assert!((cosine_similarity(&[1.0, -1.0], &[-2.0, 2.0]) + 1.0).abs() < 1e-15);
        assert_eq!(cosine_similarity(&[0.0; 3], &[0.0; 3]), 1.0);
        assert_eq!(mse(&[], &[]), 0.0);
    }

    #[test]
    fn more_bits_mean_less_noise() {
        use crate::quantize::{quantize_symmetric, Granularity};
        let x: Vec<f32> = (0..4096).map(|i| ((i as f32 * 0.37).sin() * 3.0) + 0.1 * (i % 7) as f32).collect();
        let sq = |bits| {
            let q = quantize_symmetric(&x, bits, Granularity::PerRow { cols: 256 }).unwrap();
            sqnr_db(&x, &q.dequantize())
        };
        let (s2, s4, s8) = (sq(2), sq(4), sq(8));
        assert!(s2 < s4 && s4 < s8, "{s2} {s4} {s8}");
        // About 6 dB per bit for a full-range signal.
        assert!(s8 > 35.0, "{s8}");
    }
}
