//! Float building blocks shared by every backend: dense matrices in f32/bf16/f16, RMSNorm,
//! RoPE, softmax, gates, and CPU capability detection.

pub mod cpu;
pub mod dense;
pub mod ops;
pub mod threads;

pub use dense::{DenseData, DenseMatrix};
