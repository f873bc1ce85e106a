//! Errors that name the file and say what is wrong with it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Tensor { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
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
