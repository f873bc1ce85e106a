//! bitnet-core
