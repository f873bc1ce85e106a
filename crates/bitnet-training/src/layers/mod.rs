//! The layers of the model, each a forward and an explicit backward in plain functions.
//!
//! Conventions: activations are row-major `[rows = tokens, features]`; a backward function
//! ADDS its input gradient into `dx` and its parameter gradients into `dw` (the callers zero
//! them), which makes residual branches, tied weights and gradient accumulation plain sums.

pub mod attention;
pub mod bitlinear;
pub mod cross_entropy;
pub mod embedding;
pub mod gate;
pub mod rmsnorm;
pub mod rope;
