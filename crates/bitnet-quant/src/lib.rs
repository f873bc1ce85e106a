//! bitnet-quant
