//! A byte-level GGUF builder for tests, written from the format description and independent
//! of `gguf::GgufWriter`, so that it can also write files that lie.
#![allow(dead_code)]

use std::path::PathBuf;

/// Appends GGUF fields to a byte vector; every field is explicit, nothing is checked.
#[derive(Default, Clone)]
pub struct Raw {
    pub bytes: Vec<u8>,
}

impl Raw {
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw::default();
        r.bytes.extend_from_slice(b"GGUF");
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    /// A string key with a string value.
    pub fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
        self.string(key).u32(8).string(value)
    }
    pub fn kv_u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.string(key).u32(4).u32(value)
    }
    /// A tensor info: name, dims (ggml order), type id, offset.
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        self.string(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(type_id).u64(offset)
    }
    /// Zero bytes up to a multiple of `align`.
    pub fn pad(&mut self, align: usize) -> &mut Self {
        while !self.bytes.len().is_multiple_of(align) {
            self.bytes.push(0);
        }
        self
    }
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// A fresh, empty directory under the system temp dir for one test, removed on drop.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "bitnet-gguf-test-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    TempDir(d)
}

/// The repository's `tests/data/gguf` directory.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/gguf")
}

/// The SmolLM2 GGUF named by BITNET_SMOLLM2_GGUF (`tools/fetch-test-models.sh` downloads it
/// and prints its path), or `None` after a `SKIPPED` line naming `test` on the real stderr
/// (libtest keeps what `eprintln!` writes in a passing test to itself). Under `CI=true`, whose
/// `.ci/run` always fetches the file, a missing variable is a failure, not a skip.
pub fn smollm2_gguf(test: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BITNET_SMOLLM2_GGUF") {
        return Some(p.into());
    }
    let how = "export BITNET_SMOLLM2_GGUF=\"$(tools/fetch-test-models.sh)\"";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "CI=true, where the SmolLM2 GGUF is always fetched, but BITNET_SMOLLM2_GGUF is not set: {how}"
        );
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: set BITNET_SMOLLM2_GGUF ({how})");
    None
}
