//! bitnet-inference
