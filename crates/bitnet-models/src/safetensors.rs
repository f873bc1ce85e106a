//! Memory-mapped safetensors checkpoints, single-file or sharded
//! (`model.safetensors.index.json`), with every tensor checked against the file before use.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bitnet_quant::SharedBytes;
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;

pub use crate::bytes::Bytes;
use crate::ModelError;

struct Shard {
    path: PathBuf,
    bytes: SharedBytes,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// A borrowed view of one tensor: dtype, shape, raw little-endian bytes, and where it came from.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    /// The file's bytes and where the tensor's lie in them.
    pub(crate) file: &'a SharedBytes,
    pub(crate) span: (usize, usize),
}

impl TensorRef<'_> {
    /// The tensor's bytes as a shared view of the file, for weights that read them in place.
    pub fn shared(&self) -> SharedBytes {
        // The span was checked against the file when the store was opened.
        self.file.slice(self.span.0..self.span.1).expect("a tensor inside its file")
    }

    /// Hands the tensor's mapped pages back to the kernel once it has been copied or repacked
    /// (see [`bitnet_quant::ByteSource::release`]); reading it again maps them in again.
    pub fn release(&self) {
        self.release_range(0..self.span.1 - self.span.0);
    }

    /// [`TensorRef::release`] for the bytes `range` of the tensor's data (clamped to it).
    pub fn release_range(&self, range: std::ops::Range<usize>) {
        let end = (self.span.0 + range.end).min(self.span.1);
        self.file.release_range(self.span.0 + range.start..end);
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn error(&self, message: impl std::fmt::Display) -> ModelError {
        ModelError::tensor(self.path, format!("tensor `{}`: {message}", self.name))
    }

    /// Fails unless the shape is exactly `expected`.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<(), ModelError> {
        if self.shape != expected {
            return Err(self.error(format!("has shape {:?}, expected {:?}", self.shape, expected)));
        }
        Ok(())
    }

    /// The values widened to f32 (from F32, F16 or BF16).
    pub fn to_f32(&self) -> Result<Vec<f32>, ModelError> {
        let d = self.data;
        Ok(match self.dtype {
            Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(self.error(format!("has dtype {other:?}, expected F32, F16 or BF16"))),
        })
    }

    /// The raw bytes of a U8 tensor.
    pub fn as_u8(&self) -> Result<&[u8], ModelError> {
        match self.dtype {
            Dtype::U8 => Ok(self.data),
            other => Err(self.error(format!("has dtype {other:?}, expected U8 (packed ternary)"))),
        }
    }
}

/// All tensors of a checkpoint, across its shards.
pub struct TensorStore {
    shards: Vec<Shard>,
    index: BTreeMap<String, usize>,
}

impl TensorStore {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if single.exists() {
            return Self::from_files(vec![(single.clone(), Bytes::map(&single)?)]);
        }
        if !index_path.exists() {
            return Err(ModelError::tensor(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::tensor(&index_path, format!("not valid JSON: {e}")))?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            ModelError::tensor(&index_path, "has no `weight_map` object naming the shard of each tensor")
        })?;
        let mut files: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                ModelError::tensor(&index_path, format!("weight_map entry `{name}` is not a file name"))
            })?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(ModelError::tensor(
                    &index_path,
                    format!("shard name `{file}` is not a plain file name"),
                ));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        let mut opened = Vec::new();
        for f in files {
            let p = dir.join(&f);
            opened.push((p.clone(), Bytes::map(&p)?));
        }
        Self::from_files(opened)
    }

    /// Parses already-loaded files; each header is validated against its file's length.
    pub fn from_files(files: Vec<(PathBuf, Bytes)>) -> Result<Self, ModelError> {
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (i, (path, bytes)) in files.into_iter().enumerate() {
            let bytes = bytes.into_shared();
            let (header_len, metadata) = SafeTensors::read_metadata(bytes.as_bytes()).map_err(|e| {
                ModelError::tensor(
                    &path,
                    format!("not a valid safetensors file ({})", describe(&e, bytes.len())),
                )
            })?;
            let tensors: HashMap<String, TensorInfo> =
                metadata.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
            for name in tensors.keys() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    let prev_path: &PathBuf =
                        &shards.get(prev).map(|s: &Shard| s.path.clone()).unwrap_or_default();
                    return Err(ModelError::tensor(
                        &path,
                        format!("tensor `{name}` is also in {}", prev_path.display()),
                    ));
                }
            }
            shards.push(Shard { path, bytes, data_start: 8 + header_len, tensors });
        }
        Ok(Self { shards, index })
    }

    /// Names of every tensor, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor called `name`, or an error naming the checkpoint and the missing tensor.
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>, ModelError> {
        let (key, &shard_idx) = self.index.get_key_value(name).ok_or_else(|| {
            let files: Vec<String> = self.shards.iter().map(|s| s.path.display().to_string()).collect();
            ModelError::tensor(
                self.shards.first().map(|s| s.path.as_path()).unwrap_or(Path::new("checkpoint")),
                format!("tensor `{name}` is missing (looked in {})", files.join(", ")),
            )
        })?;
        let shard = &self.shards[shard_idx];
        let info = &shard.tensors[name];
        let (start, end) = info.data_offsets;
        // read_metadata proved the offsets lie inside the file and match dtype × shape.
        let span = (shard.data_start + start, shard.data_start + end);
        let data = &shard.bytes.as_bytes()[span.0..span.1];
        Ok(TensorRef {
            name: key,
            path: &shard.path,
            dtype: info.dtype,
            shape: &info.shape,
            data,
            file: &shard.bytes,
            span,
        })
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> usize {
        self.shards.iter().flat_map(|s| s.tensors.values()).map(|t| t.data_offsets.1 - t.data_offsets.0).sum()
    }

    /// Hands every mapped page of every shard back to the kernel: what loading calls once the
    /// weights have their own copies (weights that still point into a file read their pages
    /// in again as they need them).
    pub fn release_all(&self) {
        for shard in &self.shards {
            shard.bytes.release();
        }
    }

    /// The files the tensors came from.
    pub fn paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }
}

fn describe(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("the file is {file_len} bytes, too short for the 8-byte header length"),
        E::HeaderTooLarge | E::InvalidHeaderLength => {
            format!("the header length in the first 8 bytes runs past the end of the {file_len}-byte file")
        }
        E::MetadataIncompleteBuffer => {
            format!(
                "the tensors' data offsets do not match the {file_len}-byte file: it is truncated or padded"
            )
        }
        other => other.to_string(),
    }
}
