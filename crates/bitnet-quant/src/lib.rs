//! Quantizers, packed ternary formats and ternary × int8 kernels for BitNet b1.58.
//!
//! The numerics follow `bitnet-reference.md` §2: absmean ternary weights with one scale per
//! matrix, absmax int8 activations with one scale per token, round-half-to-even.

pub mod hf_pack;
pub mod quantize;
pub mod ternary;

pub use quantize::{absmean_ternary, quantize_activation_row, ActivationScale};
pub use ternary::{QuantizedActivations, TernaryMatrix, WeightScale};

/// Errors of this crate: shapes that do not fit the data they describe.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("shape mismatch: {0}")]
    Shape(String),
}
