//! bitnet-models
