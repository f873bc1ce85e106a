//! Errors that name the file and say what is wrong with it. A message holds the whole story,
//! the OS error's text included, and `source()` returns nothing: a chain printer (anyhow's
//! `{:#}`) would print that text twice.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Tensor { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A GGUF file's error, which names the file itself.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

impl ModelError {
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), error }
    }
    pub fn config(path: &Path, message: impl Into<String>) -> Self {
        Self::Config { path: path.to_path_buf(), message: message.into() }
    }
    pub fn tensor(path: &Path, message: impl Into<String>) -> Self {
        Self::Tensor { path: path.to_path_buf(), message: message.into() }
    }
    pub fn tokenizer(path: &Path, message: impl Into<String>) -> Self {
        Self::Tokenizer { path: path.to_path_buf(), message: message.into() }
    }
}
