//! Quantizers, packed ternary formats and ternary × int8 kernels for BitNet b1.58.
//!
//! The numerics follow `bitnet-reference.md` §2: absmean ternary weights with one scale per
//! matrix, absmax int8 activations with one scale per token, round-half-to-even.
//!
//! * [`quantize`]: the quantizers; [`metrics`]: MSE, SQNR and cosine similarity.
//! * [`hf_pack`]: the Hugging Face 2-bit packing.
//! * [`layout`]: the engine's packed layout, built at load by [`TernaryMatrix::from_ternary`].
//! * [`TernaryMatrix`] / [`Int8Matrix`] × [`QuantizedActivations`]: the products, on the
//!   [`KernelPath`] chosen at run time.
//! * [`dense`]: non-ternary weights kept in their stored block format ([`DenseLinear`]: F32,
//!   F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) and their products, following llama.cpp's numerics.
//! * [`shared`]: bytes owned elsewhere (a checkpoint's file mapping) that a matrix can point
//!   into, and the hint that gives a mapping's pages back once a copy has been made.

mod aligned;
pub mod dense;
pub mod formats;
pub mod group;
pub mod hf_pack;
pub mod int16;
pub mod int6;
pub mod int8;
pub mod kernels;
pub mod layout;
pub mod metrics;
pub mod quantize;
pub mod selftest;
pub mod shared;
pub mod ternary;

pub use dense::{ActivationKind, DenseActivations, DenseError, DenseFormat, DenseLinear};
pub use group::GroupScales;
pub use int8::Int8Matrix;
pub use kernels::KernelPath;
pub use quantize::{
    absmean_ternary, quantize_activation_row, quantize_symmetric, ActivationScale, Granularity,
};
pub use shared::{ByteSource, SharedBytes};
pub use ternary::{GroupScaleRows, QuantizedActivations, TernaryCodes, TernaryMatrix, WeightScale};

/// Errors of this crate: shapes that do not fit the data they describe.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("shape mismatch: {0}")]
    Shape(String),
}
