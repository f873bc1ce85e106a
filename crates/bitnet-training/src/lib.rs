//! bitnet-training
