//! Continuous batching (written next).
