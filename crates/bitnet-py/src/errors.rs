//! How the engine's errors reach Python: missing files as `FileNotFoundError`, bad requests as
//! `ValueError`, everything else as `bitnet.BitNetError`, always with the engine's message.

use std::io::ErrorKind;
use std::path::Path;

use bitnet_inference::InferenceError;
use bitnet_models::ModelError;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyValueError};
use pyo3::PyErr;

pyo3::create_exception!(
    bitnet,
    BitNetError,
    PyException,
    "Base class of the errors the BitNet engine raises: a checkpoint it cannot read, a generation, \
conversion or training run that failed. Bad arguments raise ValueError and missing files \
FileNotFoundError instead. The message is the engine's, naming the file (and tensor or field) and \
the problem."
);

/// `FileNotFoundError(ENOENT, message, path)`: Python fills `.errno`, `.strerror` and `.filename`.
pub fn file_not_found(path: &Path, message: impl Into<String>) -> PyErr {
    const ENOENT: i32 = 2;
    PyFileNotFoundError::new_err((ENOENT, message.into(), path.display().to_string()))
}

/// Fails with `FileNotFoundError` unless `path` exists; `what` says what the path was meant to be.
pub fn require_exists(path: &Path, what: &str) -> Result<(), PyErr> {
    match path.try_exists() {
        Ok(true) => Ok(()),
        _ => Err(file_not_found(path, format!("{what} {} does not exist", path.display()))),
    }
}

pub fn value_error(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}

pub fn engine_error(message: impl std::fmt::Display) -> PyErr {
    BitNetError::new_err(message.to_string())
}

/// A checkpoint error: a file that is not there is `FileNotFoundError`, the rest `BitNetError`.
pub fn model_error(e: ModelError) -> PyErr {
    match &e {
        ModelError::Io { path, error } if error.kind() == ErrorKind::NotFound => {
            file_not_found(path, e.to_string())
        }
        _ => engine_error(e),
    }
}

/// An engine error: what the request got wrong is `ValueError`, the rest `BitNetError`.
pub fn inference_error(e: InferenceError) -> PyErr {
    match e {
        InferenceError::EmptyInput
        | InferenceError::TokenOutOfRange { .. }
        | InferenceError::ContextFull { .. }
        | InferenceError::Sampling(_) => value_error(e.to_string()),
        InferenceError::Model(m) => model_error(m),
        _ => engine_error(e),
    }
}

/// An error of the training or conversion tools, which report through `anyhow`.
pub fn tool_error(e: anyhow::Error) -> PyErr {
    match e.downcast::<ModelError>() {
        Ok(m) => model_error(m),
        Err(e) => engine_error(format!("{e:#}")),
    }
}
