//! The GGUF reader: a header parser over bytes, and a memory-mapped file on top of it.
//!
//! File layout (little-endian; v2 and v3 are the same on little-endian machines):
//!
//! ```text
//! "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv × (key: string | value type u32 | value)
//! n_tensors × (name: string | n_dims u32 | n_dims × u64 | type id u32 | offset u64)
//! zero padding to `general.alignment` (default 32)
//! data section: each tensor at `data_offset + offset`, offsets multiples of the alignment
//! ```
//!
//! A string is a u64 byte length and UTF-8 bytes; an array is an element type u32, a u64
//! count, then the elements (an array element is itself type, count and elements).
//!
//! Nothing in the file is trusted: every count is checked against the bytes left before
//! anything is allocated for it, every offset and size against the file length, and every
//! failure is a [`GgufError`] naming the file, the field and its offset.

use super::dialect::{self, Dialect, RawTensor};
use super::error::GgufError;
use super::value::{GgufArray, GgufMetadata, GgufValue, GgufValueType};
use crate::bytes::Bytes;
use bitnet_quant::formats::{self, GgmlType, TernaryCodes};
use bitnet_quant::SharedBytes;
use std::collections::{HashMap, HashSet};
use std::path::Path;

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const KEY_ALIGNMENT: &str = "general.alignment";
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Arrays nest at most this deep; deeper is an error rather than a deep recursion.
pub const MAX_ARRAY_DEPTH: u32 = 16;

/// One tensor's entry in the header, checked against the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    name: String,
    shape: Vec<u64>,
    ggml_type: GgmlType,
    type_id: u32,
    offset: u64,
    n_elements: u64,
    n_bytes: u64,
    info_offset: u64,
}

impl TensorInfo {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Dimensions in ggml order: `shape()[0]` is `ne[0]`, the contiguous row. A PyTorch
    /// `[rows, cols]` matrix is `[cols, rows]` here.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }
    /// The type id as stored, before the dialect gave it a meaning.
    pub fn type_id(&self) -> u32 {
        self.type_id
    }
    /// Offset of the data from the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn n_elements(&self) -> u64 {
        self.n_elements
    }
    pub fn n_bytes(&self) -> u64 {
        self.n_bytes
    }
    /// Where this tensor's header entry starts in the file.
    pub fn info_offset(&self) -> u64 {
        self.info_offset
    }
}

/// A parsed and checked GGUF header: metadata, tensor infos, layout and dialect.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    file: String,
    version: u32,
    metadata: GgufMetadata,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
    dialect: Dialect,
    dialect_reason: String,
}

/// A bounds-checked reader over the file bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    /// A capacity to reserve for `n` values of `T`: never more memory than the bytes left,
    /// so a lying count cannot make a large allocation; real data grows the vector as it is
    /// read.
    fn capacity<T>(&self, n: u64) -> usize {
        n.min(self.remaining() / std::mem::size_of::<T>().max(1) as u64) as usize
    }

    fn truncated(&self, field: String, needed: u64) -> GgufError {
        GgufError::Truncated {
            file: self.file.to_owned(),
            field,
            offset: self.pos as u64,
            needed,
            file_len: self.bytes.len() as u64,
        }
    }

    fn invalid(&self, field: String, offset: usize, reason: String) -> GgufError {
        GgufError::Invalid { file: self.file.to_owned(), field, offset: offset as u64, reason }
    }

    fn take(&mut self, n: u64, field: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(field(), n));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, field: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let b = self.take(N as u64, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u32(&mut self, field: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &dyn Fn() -> String) -> Result<String, GgufError> {
        let at = self.pos;
        let len = self.u64(&|| format!("{} length", field()))?;
        if len > self.remaining() {
            return Err(self.invalid(
                format!("{} length", field()),
                at,
                format!("{len} bytes, but only {} are left in the file", self.remaining()),
            ));
        }
        let start = self.pos;
        let bytes = self.take(len, field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.invalid(field(), start, format!("not UTF-8: {e}"))),
        }
    }

    /// Checks that `count` values of at least `min_size` bytes each can fit in what is left.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        at: usize,
        field: &dyn Fn() -> String,
    ) -> Result<(), GgufError> {
        if count > self.remaining() / min_size.max(1) {
            return Err(self.invalid(
                field(),
                at,
                format!(
                    "{count} entries of at least {min_size} bytes cannot fit in the {} bytes left",
                    self.remaining()
                ),
            ));
        }
        Ok(())
    }

    fn value_type(&mut self, field: &dyn Fn() -> String) -> Result<GgufValueType, GgufError> {
        let at = self.pos;
        let id = self.u32(field)?;
        GgufValueType::from_id(id)
            .ok_or_else(|| self.invalid(field(), at, format!("unknown value type {id}")))
    }

    fn value(
        &mut self,
        ty: GgufValueType,
        depth: u32,
        field: &dyn Fn() -> String,
    ) -> Result<GgufValue, GgufError> {
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufValue::U8(self.array::<1>(field)?[0]),
            T::I8 => GgufValue::I8(self.array::<1>(field)?[0] as i8),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array(field)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array(field)?)),
            T::U32 => GgufValue::U32(self.u32(field)?),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array(field)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array(field)?)),
            T::U64 => GgufValue::U64(self.u64(field)?),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array(field)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array(field)?)),
            T::Bool => {
                let at = self.pos;
                GgufValue::Bool(self.bool(at, field)?)
            }
            T::String => GgufValue::String(self.string(field)?),
            T::Array => GgufValue::Array(self.array_value(depth, field)?),
        })
    }

    fn bool(&mut self, at: usize, field: &dyn Fn() -> String) -> Result<bool, GgufError> {
        match self.array::<1>(field)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.invalid(field(), at, format!("bool byte is {b}, not 0 or 1"))),
        }
    }

    /// Reads `n` fixed-size elements after checking they fit.
    fn fixed<T, const N: usize>(
        &mut self,
        n: u64,
        field: &dyn Fn() -> String,
        conv: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        let bytes = n.checked_mul(N as u64).filter(|&b| b <= self.remaining()).ok_or_else(|| {
            self.invalid(
                field(),
                self.pos,
                format!("{n} elements of {N} bytes cannot fit in the {} bytes left", self.remaining()),
            )
        })?;
        let raw = self.take(bytes, field)?;
        Ok(raw
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                conv(a)
            })
            .collect())
    }

    fn array_value(&mut self, depth: u32, field: &dyn Fn() -> String) -> Result<GgufArray, GgufError> {
        let at = self.pos;
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.invalid(field(), at, format!("arrays nested deeper than {MAX_ARRAY_DEPTH}")));
        }
        let elem = self.value_type(&|| format!("{} element type", field()))?;
        let count_at = self.pos;
        let n = self.u64(&|| format!("{} count", field()))?;
        let count_field = || format!("{} count", field());
        self.check_count(n, elem.min_encoded_size(), count_at, &count_field)?;
        // `n` now fits in what is left of the file, so reservations below are bounded by it.
        let elem_field = |i: u64| move || format!("{}[{i}]", field());
        use GgufValueType as T;
        Ok(match elem {
            T::U8 => GgufArray::U8(self.fixed(n, field, |[b]: [u8; 1]| b)?),
            T::I8 => GgufArray::I8(self.fixed(n, field, |[b]: [u8; 1]| b as i8)?),
            T::U16 => GgufArray::U16(self.fixed(n, field, u16::from_le_bytes)?),
            T::I16 => GgufArray::I16(self.fixed(n, field, i16::from_le_bytes)?),
            T::U32 => GgufArray::U32(self.fixed(n, field, u32::from_le_bytes)?),
            T::I32 => GgufArray::I32(self.fixed(n, field, i32::from_le_bytes)?),
            T::F32 => GgufArray::F32(self.fixed(n, field, f32::from_le_bytes)?),
            T::U64 => GgufArray::U64(self.fixed(n, field, u64::from_le_bytes)?),
            T::I64 => GgufArray::I64(self.fixed(n, field, i64::from_le_bytes)?),
            T::F64 => GgufArray::F64(self.fixed(n, field, f64::from_le_bytes)?),
            T::Bool => {
                let mut v = Vec::with_capacity(self.capacity::<bool>(n));
                for i in 0..n {
                    let at = self.pos;
                    v.push(self.bool(at, &elem_field(i))?);
                }
                GgufArray::Bool(v)
            }
            T::String => {
                let mut v = Vec::with_capacity(self.capacity::<String>(n));
                for i in 0..n {
                    v.push(self.string(&elem_field(i))?);
                }
                GgufArray::String(v)
            }
            T::Array => {
                let mut v = Vec::with_capacity(self.capacity::<GgufArray>(n));
                for i in 0..n {
                    v.push(self.array_value(depth + 1, &elem_field(i))?);
                }
                GgufArray::Array(v)
            }
        })
    }
}

/// A tensor info as read, before the dialect gives its type id a meaning.
struct RawInfo {
    name: String,
    shape: Vec<u64>,
    n_elements: u64,
    type_id: u32,
    type_at: usize,
    offset: u64,
    offset_at: usize,
    info_at: usize,
}

impl GgufHeader {
    /// Parses and checks the header of a GGUF file held in `bytes`. `file` names the file
    /// in error messages.
    pub fn parse(bytes: &[u8], file: &str) -> Result<Self, GgufError> {
        let mut c = Cursor { bytes, pos: 0, file };
        let magic = bytes.get(..4).unwrap_or(bytes);
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { file: file.to_owned(), found: magic.to_vec() });
        }
        c.pos = 4;
        let version = c.u32(&|| "version".into())?;
        if version != 2 && version != 3 {
            let hint = if version == 1 {
                " (GGUF v1 used 32-bit counts; convert the file with a current llama.cpp)"
            } else if version & 0xFFFF == 0 {
                " (the bytes look big-endian, which is not supported)"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion { file: file.to_owned(), version, hint });
        }
        let n_tensors_at = c.pos;
        let n_tensors = c.u64(&|| "tensor count".into())?;
        let n_kv_at = c.pos;
        let n_kv = c.u64(&|| "metadata count".into())?;
        // A key/value takes at least 13 bytes (8 key length, 4 type, 1 value); a tensor info
        // at least 24 (8 name length, 4 dims, 4 type, 8 offset).
        c.check_count(n_kv, 13, n_kv_at, &|| "metadata count".into())?;
        c.check_count(n_tensors, 24, n_tensors_at, &|| "tensor count".into())?;

        let mut metadata = GgufMetadata::new();
        let mut alignment_at = 0;
        for i in 0..n_kv {
            let key_at = c.pos;
            let key = c.string(&|| format!("metadata[{i}] key"))?;
            if key.is_empty() {
                return Err(c.invalid(format!("metadata[{i}] key"), key_at, "empty key".into()));
            }
            if metadata.contains_key(&key) {
                return Err(c.invalid(
                    format!("metadata[{i}] key"),
                    key_at,
                    format!("duplicate key '{key}'"),
                ));
            }
            if key == KEY_ALIGNMENT {
                alignment_at = key_at;
            }
            let field = || format!("metadata '{key}'");
            let ty = c.value_type(&|| format!("metadata '{key}' type"))?;
            let value = c.value(ty, 0, &field)?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get(KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(GgufError::Invalid {
                    file: file.to_owned(),
                    field: format!("metadata '{KEY_ALIGNMENT}'"),
                    offset: alignment_at as u64,
                    reason: format!("{v:?} is not a u32 power of two"),
                })
            }
        };

        let mut raw = Vec::with_capacity(c.capacity::<RawInfo>(n_tensors));
        let mut names = HashSet::with_capacity(c.capacity::<(String, u64)>(n_tensors));
        for i in 0..n_tensors {
            let info_at = c.pos;
            let name = c.string(&|| format!("tensor[{i}] name"))?;
            // Every writer names its tensors; an empty name is what a tensor count larger than
            // the tensors written reads out of the zero padding after the real ones.
            if name.is_empty() {
                return Err(c.invalid(
                    format!("tensor[{i}] name"),
                    info_at,
                    format!("empty name: the file says it holds {n_tensors} tensors, is the count too high?"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(c.invalid(
                    format!("tensor[{i}] name"),
                    info_at,
                    format!("duplicate tensor name '{name}'"),
                ));
            }
            let field = |what: &str| format!("tensor[{i}] '{name}' {what}");
            let dims_at = c.pos;
            let n_dims = c.u32(&|| field("n_dims"))?;
            if n_dims > MAX_DIMS {
                return Err(c.invalid(
                    field("n_dims"),
                    dims_at,
                    format!("{n_dims} dimensions, ggml allows at most {MAX_DIMS}"),
                ));
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            let mut n_elements: u64 = 1;
            for d in 0..n_dims {
                let at = c.pos;
                let dim = c.u64(&|| field(&format!("dims[{d}]")))?;
                n_elements =
                    n_elements.checked_mul(dim).filter(|&n| n <= i64::MAX as u64).ok_or_else(|| {
                        c.invalid(
                            field(&format!("dims[{d}]")),
                            at,
                            format!("{shape:?} × {dim} elements overflow i64"),
                        )
                    })?;
                shape.push(dim);
            }
            let type_at = c.pos;
            let type_id = c.u32(&|| field("type"))?;
            let offset_at = c.pos;
            let offset = c.u64(&|| field("offset"))?;
            raw.push(RawInfo { name, shape, n_elements, type_id, type_at, offset, offset_at, info_at });
        }

        let data_offset = (c.pos as u64).next_multiple_of(alignment);
        let file_len = bytes.len() as u64;
        if n_tensors > 0 && data_offset > file_len {
            return Err(GgufError::Truncated {
                file: file.to_owned(),
                field: "padding before the data section".into(),
                offset: c.pos as u64,
                needed: data_offset - c.pos as u64,
                file_len,
            });
        }
        let data_len = file_len.saturating_sub(data_offset);

        // Room of each tensor: up to the next tensor's offset, or the end of the data.
        let mut by_offset: Vec<usize> = (0..raw.len()).collect();
        by_offset.sort_by_key(|&i| raw[i].offset);
        let mut room = vec![None; raw.len()];
        let mut next_start = data_len;
        let mut next_offset = None;
        for &i in by_offset.iter().rev() {
            let o = raw[i].offset;
            match next_offset {
                Some(n) if n > o => next_start = n,
                _ => {}
            }
            room[i] = next_start.checked_sub(o);
            next_offset = Some(o);
        }
        let raw_view: Vec<RawTensor<'_>> = raw
            .iter()
            .zip(&room)
            .map(|(r, &room)| RawTensor { name: &r.name, type_id: r.type_id, shape: &r.shape, room })
            .collect();
        let (dialect, dialect_reason) = dialect::detect(&metadata, &raw_view, alignment);

        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = HashMap::with_capacity(raw.len());
        for (i, r) in raw.into_iter().enumerate() {
            let field = |what: &str| format!("tensor[{i}] '{}' {what}", r.name);
            let ggml_type = dialect::type_from_id(r.type_id, dialect).ok_or_else(|| {
                c.invalid(
                    field("type"),
                    r.type_at,
                    format!(
                        "type id {} is not a tensor type in the {dialect} dialect ({dialect_reason})",
                        r.type_id
                    ),
                )
            })?;
            let n_bytes = ggml_type.tensor_bytes(&r.shape).ok_or_else(|| {
                let (block, _) = ggml_type.block_geometry();
                c.invalid(
                    field("dims"),
                    r.info_at,
                    format!(
                        "shape {:?} does not fit type {ggml_type} (blocks of {block} along dims[0])",
                        r.shape
                    ),
                )
            })?;
            if r.offset % alignment != 0 {
                return Err(c.invalid(
                    field("offset"),
                    r.offset_at,
                    format!("{} is not a multiple of the alignment {alignment}", r.offset),
                ));
            }
            let end = r.offset.checked_add(n_bytes).filter(|&e| e <= data_len);
            if end.is_none() {
                return Err(c.invalid(
                    field("offset"),
                    r.offset_at,
                    format!(
                        "data at {} + {} bytes runs past the end of the data section \
                         ({data_len} bytes from offset {data_offset})",
                        r.offset, n_bytes
                    ),
                ));
            }
            index.insert(r.name.clone(), i);
            tensors.push(TensorInfo {
                name: r.name,
                shape: r.shape,
                ggml_type,
                type_id: r.type_id,
                offset: r.offset,
                n_elements: r.n_elements,
                n_bytes,
                info_offset: r.info_at as u64,
            });
        }

        Ok(GgufHeader {
            file: file.to_owned(),
            version,
            metadata,
            tensors,
            index,
            alignment,
            data_offset,
            file_len,
            dialect,
            dialect_reason,
        })
    }

    /// The name used for this file in messages.
    pub fn file(&self) -> &str {
        &self.file
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn metadata(&self) -> &GgufMetadata {
        &self.metadata
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Where the data section starts in the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }
    /// Why the reader chose [`GgufHeader::dialect`], in words.
    pub fn dialect_reason(&self) -> &str {
        &self.dialect_reason
    }

    /// The bytes of tensor `name` within `bytes`, the file the header was parsed from.
    pub fn tensor_data<'b>(&self, bytes: &'b [u8], name: &str) -> Result<&'b [u8], GgufError> {
        self.tensor_span(bytes.len(), name).map(|span| &bytes[span])
    }

    /// Where the bytes of tensor `name` lie in a file of `file_len` bytes.
    fn tensor_span(&self, file_len: usize, name: &str) -> Result<std::ops::Range<usize>, GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::NoSuchTensor { file: self.file.clone(), name: name.to_owned() })?;
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_len as u64 => Ok(s as usize..e as usize),
            _ => Err(GgufError::Invalid {
                file: self.file.clone(),
                field: format!("tensor '{name}' data"),
                offset: info.info_offset,
                reason: format!("the bytes given hold {file_len} bytes, fewer than the header says"),
            }),
        }
    }
}

/// A GGUF file: the checked header and the bytes, memory-mapped when opened from disk.
pub struct GgufFile {
    header: GgufHeader,
    storage: SharedBytes,
}

impl GgufFile {
    /// Opens and memory-maps `path`, then parses and checks its header.
    ///
    /// The map is read-only; as with any memory map, another process truncating the file
    /// while it is open is outside what Rust can make safe.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let io = |action: &'static str| {
            let name = name.clone();
            move |error| GgufError::Io { file: name, action, error }
        };
        let file = std::fs::File::open(path).map_err(io("cannot open"))?;
        let len = file.metadata().map_err(io("cannot stat"))?.len();
        let storage = if len == 0 {
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and lives as long as the GgufFile (and the weights
            // that share it); the file is not expected to change under us (the usual contract
            // of mapped model files; writers here replace a file by renaming a new one over it).
            Bytes::Mapped(unsafe { memmap2::Mmap::map(&file) }.map_err(io("cannot map"))?)
        }
        .into_shared();
        let header = GgufHeader::parse(storage.as_bytes(), &name)?;
        Ok(GgufFile { header, storage })
    }

    /// Parses a GGUF file held in memory; `file` names it in messages.
    pub fn from_bytes(bytes: Vec<u8>, file: &str) -> Result<Self, GgufError> {
        let header = GgufHeader::parse(&bytes, file)?;
        Ok(GgufFile { header, storage: Bytes::Owned(bytes).into_shared() })
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }
    pub fn file(&self) -> &str {
        self.header.file()
    }
    pub fn version(&self) -> u32 {
        self.header.version()
    }
    pub fn metadata(&self) -> &GgufMetadata {
        self.header.metadata()
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        self.header.tensors()
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensor(name)
    }
    pub fn alignment(&self) -> u64 {
        self.header.alignment()
    }
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset()
    }
    pub fn dialect(&self) -> Dialect {
        self.header.dialect()
    }
    pub fn dialect_reason(&self) -> &str {
        self.header.dialect_reason()
    }
    /// All bytes of the file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.as_bytes()
    }

    /// The raw bytes of tensor `name`.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8], GgufError> {
        self.header.tensor_data(self.storage.as_bytes(), name)
    }

    /// The raw bytes of tensor `name` as a shared view of the file, for weights that read them
    /// in place.
    pub fn tensor_shared(&self, name: &str) -> Result<SharedBytes, GgufError> {
        let span = self.header.tensor_span(self.storage.len(), name)?;
        // The span is a sub-slice of the file's bytes (`tensor_data` checked it).
        Ok(self.storage.slice(span).expect("a tensor inside its file"))
    }

    /// Hands tensor `name`'s mapped pages back to the kernel once it has been copied or
    /// repacked (see [`bitnet_quant::ByteSource::release`]); unknown names are ignored.
    pub fn release_tensor(&self, name: &str) {
        if let Ok(span) = self.header.tensor_span(self.storage.len(), name) {
            self.storage.release_range(span);
        }
    }

    /// Hands every mapped page of the file back to the kernel.
    pub fn release_all(&self) {
        self.storage.release();
    }

    fn info_and_len(&self, name: &str) -> Result<(&TensorInfo, usize), GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::NoSuchTensor { file: self.file().to_owned(), name: name.to_owned() })?;
        let n = usize::try_from(info.n_elements).map_err(|_| GgufError::Invalid {
            file: self.file().to_owned(),
            field: format!("tensor '{name}' dims"),
            offset: info.info_offset,
            reason: "more elements than this machine can address".into(),
        })?;
        Ok((info, n))
    }

    /// Tensor `name` as f32 values, for the formats `bitnet_quant::formats` can dequantize.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let (info, n) = self.info_and_len(name)?;
        let data = self.tensor_data(name)?;
        formats::dequantize(info.ggml_type, data, n).map_err(|error| GgufError::Format {
            file: self.file().to_owned(),
            tensor: name.to_owned(),
            error,
        })
    }

    /// The exact ternary codes and scales of a ternary tensor (TQ1_0, TQ2_0, Q1_0, Q2_0,
    /// PQ2_0, PTQ1_0, I2_S).
    pub fn ternary_codes(&self, name: &str) -> Result<TernaryCodes, GgufError> {
        let (info, n) = self.info_and_len(name)?;
        let data = self.tensor_data(name)?;
        formats::ternary_codes(info.ggml_type, data, n).map_err(|error| GgufError::Format {
            file: self.file().to_owned(),
            tensor: name.to_owned(),
            error,
        })
    }
}
