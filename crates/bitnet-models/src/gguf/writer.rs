//! The GGUF writer: plan first, then stream.
//!
//! The header holds every tensor's offset, so the writer takes the full list of tensors
//! (name, type, shape) up front, writes the header, and then takes each tensor's bytes in
//! plan order, one at a time, so a model larger than memory can be converted. Everything
//! goes to a temporary file beside the destination ([`crate::temp_file`]), renamed over it
//! only by [`GgufWriter::finish`] once every tensor is in: an error leaves no half file under
//! the real name, and no temporary file either (nor does a signal, when the program's handler
//! calls [`crate::temp_file::abandon_all`]).
//!
//! The output is GGUF v3 (or v2 on request; on little-endian the two are byte-identical but
//! for the version field), with each tensor's data padded to the alignment, as llama.cpp
//! and gguf-py write it. Type ids follow the dialect the tensor types need (see
//! [`super::dialect`]): bitnet.cpp numbering if any tensor is I2_S/TL1/TL2, PrismML's if any
//! is PQ2_0/PTQ1_0, upstream otherwise.

use super::dialect::{self, Dialect};
use super::error::GgufError;
use super::reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC, KEY_ALIGNMENT, MAX_DIMS};
use super::value::{GgufArray, GgufMetadata, GgufValue};
use bitnet_quant::formats::GgmlType;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::temp_file::TempFile;

/// llama.cpp refuses tensor names of this many bytes or more (`GGML_MAX_NAME`); the reader
/// accepts them, the writer does not write files llama.cpp cannot load.
pub const MAX_NAME_LEN: usize = 64;

/// A tensor the writer will write: its name, type and shape (ggml order, `shape[0]` the row).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub ggml_type: GgmlType,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, ggml_type: GgmlType, shape: &[u64]) -> Self {
        TensorSpec { name: name.into(), ggml_type, shape: shape.to_vec() }
    }
}

/// Options of [`GgufWriter::create_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterOptions {
    /// GGUF version to write: 3 (default) or 2.
    pub version: u32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions { version: 3 }
    }
}

struct Planned {
    spec: TensorSpec,
    n_bytes: u64,
}

/// A GGUF file being written. See the module doc.
pub struct GgufWriter {
    path: PathBuf,
    // Declared before `tmp` so that it is closed before `tmp`'s drop removes the file.
    out: Option<BufWriter<File>>,
    tmp: TempFile,
    plan: Vec<Planned>,
    next: usize,
    written: u64,
    alignment: u64,
    dialect: Dialect,
}

/// Appends the GGUF encoding of values to a buffer.
struct Enc(Vec<u8>);

impl Enc {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn string(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn value(&mut self, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => self.0.push(*x),
            GgufValue::I8(x) => self.0.push(*x as u8),
            GgufValue::U16(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => self.u32(*x),
            GgufValue::I32(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => self.0.push(u8::from(*x)),
            GgufValue::String(s) => self.string(s),
            GgufValue::Array(a) => self.array(a),
            GgufValue::U64(x) => self.u64(*x),
            GgufValue::I64(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => self.0.extend_from_slice(&x.to_le_bytes()),
        }
    }
    /// Element type, count, elements; an inner array repeats all three.
    fn array(&mut self, a: &GgufArray) {
        self.u32(a.element_type().id());
        self.u64(a.len() as u64);
        let b = &mut self.0;
        match a {
            GgufArray::U8(v) => b.extend_from_slice(v),
            GgufArray::I8(v) => b.extend(v.iter().map(|&x| x as u8)),
            GgufArray::U16(v) => b.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            GgufArray::I16(v) => b.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            GgufArray::U32(v) => b.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            GgufArray::I32(v) => b.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            GgufArray::F32(v) => b.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            GgufArray::Bool(v) => b.extend(v.iter().map(|&x| u8::from(x))),
            GgufArray::U64(v) => b.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            GgufArray::I64(v) => b.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            GgufArray::F64(v) => b.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            GgufArray::String(v) => v.iter().for_each(|s| self.string(s)),
            GgufArray::Array(v) => v.iter().for_each(|inner| self.array(inner)),
        }
    }
}

/// Distinguishes temporary files of several writers in one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl GgufWriter {
    /// Plans a GGUF v3 file at `path` with `metadata` and `tensors`, and writes its header.
    pub fn create(
        path: impl AsRef<Path>,
        metadata: &GgufMetadata,
        tensors: Vec<TensorSpec>,
    ) -> Result<Self, GgufError> {
        Self::create_with(path, metadata, tensors, WriterOptions::default())
    }

    /// As [`GgufWriter::create`], with options.
    pub fn create_with(
        path: impl AsRef<Path>,
        metadata: &GgufMetadata,
        tensors: Vec<TensorSpec>,
        options: WriterOptions,
    ) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let plan_err = |reason: String| GgufError::Plan { path: path.clone(), reason };
        if options.version != 2 && options.version != 3 {
            return Err(plan_err(format!("GGUF version {} cannot be written (2 or 3)", options.version)));
        }
        let alignment = match metadata.get(KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(plan_err(format!("{KEY_ALIGNMENT} must be a u32 power of two, got {v:?}")))
            }
        };
        let dialect = dialect::dialect_for_types(tensors.iter().map(|t| t.ggml_type)).ok_or_else(|| {
            plan_err(
                "the tensors mix bitnet.cpp-only types (I2_S, TL1, TL2) with upstream or \
                     PrismML types (MXFP4, NVFP4, Q1_0, Q2_0, PQ2_0, PTQ1_0): no GGUF dialect holds both"
                    .into(),
            )
        })?;

        let mut enc = Enc(Vec::new());
        enc.0.extend_from_slice(&GGUF_MAGIC);
        enc.u32(options.version);
        enc.u64(tensors.len() as u64);
        enc.u64(metadata.len() as u64);
        for (key, value) in metadata.iter() {
            if key.is_empty() {
                return Err(plan_err("an empty metadata key".into()));
            }
            enc.string(key);
            enc.u32(value.value_type().id());
            enc.value(value);
        }

        let mut names = HashSet::new();
        let mut plan = Vec::with_capacity(tensors.len());
        let mut offset: u64 = 0;
        for spec in tensors {
            let bad = |why: String| plan_err(format!("tensor '{}': {why}", spec.name));
            if !names.insert(spec.name.clone()) {
                return Err(bad("the name appears twice".into()));
            }
            if spec.name.is_empty() || spec.name.len() >= MAX_NAME_LEN {
                return Err(bad(format!(
                    "names must be 1 to {} bytes (llama.cpp's GGML_MAX_NAME)",
                    MAX_NAME_LEN - 1
                )));
            }
            if spec.shape.len() > MAX_DIMS as usize {
                return Err(bad(format!("{} dimensions, at most {MAX_DIMS}", spec.shape.len())));
            }
            let n_bytes = spec
                .ggml_type
                .tensor_bytes(&spec.shape)
                .ok_or_else(|| bad(format!("shape {:?} does not fit type {}", spec.shape, spec.ggml_type)))?;
            let id = dialect::type_id(spec.ggml_type, dialect)
                .ok_or_else(|| bad(format!("type {} has no id in GGUF", spec.ggml_type)))?;
            enc.string(&spec.name);
            enc.u32(spec.shape.len() as u32);
            spec.shape.iter().for_each(|&d| enc.u64(d));
            enc.u32(id);
            enc.u64(offset);
            offset = offset
                .checked_add(n_bytes)
                .and_then(|o| o.checked_next_multiple_of(alignment))
                .ok_or_else(|| bad("the data section overflows u64".into()))?;
            plan.push(Planned { spec, n_bytes });
        }
        let header_len = (enc.0.len() as u64).next_multiple_of(alignment);
        enc.0.resize(header_len as usize, 0);

        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .ok_or_else(|| plan_err("the path has no file name".into()))?
            .to_string_lossy()
            .into_owned();
        let tmp = dir.join(format!(
            ".{file_name}.{}-{}.tmp",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let (tmp, file) =
            TempFile::create(tmp.clone(), |p| File::options().write(true).create_new(true).open(p)).map_err(
                |error| GgufError::Io {
                    file: tmp.display().to_string(),
                    action: "cannot create the temporary file",
                    error,
                },
            )?;
        let mut w = GgufWriter {
            path,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            tmp,
            plan,
            next: 0,
            written: 0,
            alignment,
            dialect,
        };
        w.write_all(&enc.0)?;
        w.written = 0;
        Ok(w)
    }

    /// The dialect whose type ids the file uses.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The tensor the writer expects next, if any.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.plan.get(self.next).map(|p| &p.spec)
    }

    fn plan_err(&self, reason: String) -> GgufError {
        GgufError::Plan { path: self.path.clone(), reason }
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        let out = self.out.as_mut().ok_or_else(|| GgufError::Plan {
            path: self.path.clone(),
            reason: "the writer failed earlier and cannot go on".into(),
        })?;
        if let Err(error) = out.write_all(bytes) {
            self.out = None;
            return Err(GgufError::Io {
                file: self.tmp.path().display().to_string(),
                action: "cannot write",
                error,
            });
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Checks that `name` is the next planned tensor; returns its byte count.
    fn begin(&self, name: &str) -> Result<u64, GgufError> {
        match self.plan.get(self.next) {
            Some(p) if p.spec.name == name => Ok(p.n_bytes),
            Some(p) => Err(self.plan_err(format!(
                "tensor '{name}' given, but the plan has '{}' next (tensors go in plan order)",
                p.spec.name
            ))),
            None => Err(self.plan_err(format!("tensor '{name}' given, but every planned tensor is written"))),
        }
    }

    /// Pads the data of the tensor just written to the alignment.
    fn end(&mut self) -> Result<(), GgufError> {
        let pad = self.written.next_multiple_of(self.alignment) - self.written;
        self.write_all(&vec![0u8; pad as usize])?;
        self.next += 1;
        Ok(())
    }

    /// Writes the bytes of the next planned tensor, which must be `name`.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), GgufError> {
        let n_bytes = self.begin(name)?;
        if data.len() as u64 != n_bytes {
            return Err(self.plan_err(format!("tensor '{name}' needs {n_bytes} bytes, got {}", data.len())));
        }
        self.write_all(data)?;
        self.end()
    }

    /// Writes the next planned tensor, `name`, from exactly its byte count read off `reader`.
    pub fn write_tensor_from(&mut self, name: &str, reader: &mut dyn Read) -> Result<(), GgufError> {
        let n_bytes = self.begin(name)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = n_bytes;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let got = match reader.read(&mut buf[..want]) {
                Ok(0) => {
                    self.out = None;
                    return Err(self.plan_err(format!(
                        "tensor '{name}': the reader ended {left} bytes short of {n_bytes}"
                    )));
                }
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.out = None;
                    return Err(GgufError::Io {
                        file: self.path.display().to_string(),
                        action: "cannot read tensor data to write",
                        error,
                    });
                }
            };
            self.write_all(&buf[..got])?;
            left -= got as u64;
        }
        self.end()
    }

    /// Checks every planned tensor is written, syncs the file and renames it into place.
    pub fn finish(mut self) -> Result<PathBuf, GgufError> {
        if let Some(p) = self.plan.get(self.next) {
            return Err(self.plan_err(format!(
                "finish with {} of {} tensors written; '{}' is next",
                self.next,
                self.plan.len(),
                p.spec.name
            )));
        }
        let out = self.out.take().ok_or_else(|| self.plan_err("the writer failed earlier".into()))?;
        let tmp_name = self.tmp.path().display().to_string();
        let io = |action: &'static str| {
            let file = tmp_name.clone();
            move |error| GgufError::Io { file, action, error }
        };
        let file = out.into_inner().map_err(|e| e.into_error()).map_err(io("cannot flush"))?;
        file.sync_all().map_err(io("cannot sync"))?;
        drop(file);
        let GgufWriter { path, tmp, .. } = self;
        tmp.persist(&path).map_err(io("cannot rename into place"))?;
        Ok(path)
    }
}

/// Writes a whole file from tensors in memory: `metadata`, then each `(spec, bytes)`.
pub fn write_gguf(
    path: impl AsRef<Path>,
    metadata: &GgufMetadata,
    tensors: &[(TensorSpec, &[u8])],
) -> Result<PathBuf, GgufError> {
    let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = GgufWriter::create(path, metadata, specs)?;
    for (spec, data) in tensors {
        w.write_tensor(&spec.name, data)?;
    }
    w.finish()
}
