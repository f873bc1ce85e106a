//! Errors of the GGUF reader, writer and tokenizer. Every message names the file, and for a
//! malformed file the field and its byte offset, so that a bad download can be told from a bug.
//!
//! A message holds the whole story, the underlying error's text included, and `source()`
//! returns nothing: a chain printer (anyhow's `{:#}`) would print that text twice.

use bitnet_quant::formats::FormatError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{file}: {action}: {error}")]
    Io { file: String, action: &'static str, error: std::io::Error },

    #[error("{file}: not a GGUF file: the magic at offset 0 is {}, expected \"GGUF\"", magic_text(found))]
    BadMagic { file: String, found: Vec<u8> },

    #[error("{file}: GGUF version {version} at offset 4 is not supported (2 and 3 are){hint}")]
    UnsupportedVersion { file: String, version: u32, hint: &'static str },

    /// A field that needs more bytes than the file has left.
    #[error("{file}: {field} at offset {offset} needs {needed} bytes but the file ends at {file_len}")]
    Truncated { file: String, field: String, offset: u64, needed: u64, file_len: u64 },

    /// A field whose value is impossible or inconsistent with the rest of the file.
    #[error("{file}: {field} at offset {offset}: {reason}")]
    Invalid { file: String, field: String, offset: u64, reason: String },

    #[error("{file}: no tensor named '{name}'")]
    NoSuchTensor { file: String, name: String },

    #[error("{file}: tensor '{tensor}': {error}")]
    Format { file: String, tensor: String, error: FormatError },

    #[error("{file}: metadata key '{key}' is missing")]
    MissingKey { file: String, key: String },

    #[error("{file}: metadata key '{key}' is {found}, expected {expected}")]
    WrongType { file: String, key: String, expected: &'static str, found: String },

    #[error("{file}: tokenizer: {reason}")]
    Tokenizer { file: String, reason: String },

    /// A writer used against its plan: an unknown or repeated tensor, a wrong byte count.
    #[error("{path}: {reason}", path = path.display())]
    Plan { path: PathBuf, reason: String },
}

/// Leading bytes as text and hex, `"GGUX" (47 47 55 58)`, or `empty (the file has no bytes)`.
fn magic_text(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "empty (the file has no bytes)".into();
    }
    let text: String = bytes.iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '.' }).collect();
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{text}\" ({})", hex.join(" "))
}
