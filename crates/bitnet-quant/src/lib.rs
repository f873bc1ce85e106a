//! bitnet-quant
pub mod formats;
