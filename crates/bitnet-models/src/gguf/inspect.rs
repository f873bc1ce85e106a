//! A summary of a GGUF file for `bitnet inspect`: readable text, or JSON.

use super::reader::GgufHeader;
use super::value::{GgufArray, GgufValue};
use serde_json::{json, Value};
use std::fmt::Write;

/// Elements of an array shown before "… N more".
const ARRAY_HEAD: usize = 8;
/// Characters of a string shown before it is cut.
const STRING_HEAD: usize = 96;

fn short_string(s: &str) -> String {
    let n = s.chars().count();
    if n <= STRING_HEAD {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(STRING_HEAD).collect();
        format!("{head:?}… ({n} chars)")
    }
}

fn array_summary(a: &GgufArray) -> String {
    let n = a.len();
    let items: Vec<String> =
        (0..n.min(ARRAY_HEAD)).filter_map(|i| a.get(i)).map(|v| value_summary(&v)).collect();
    let more = if n > ARRAY_HEAD { format!(", … {} more", n - ARRAY_HEAD) } else { String::new() };
    format!("[{}{more}]", items.join(", "))
}

fn type_summary(v: &GgufValue) -> String {
    match v {
        GgufValue::Array(a) => format!("array<{}>[{}]", a.element_type(), a.len()),
        other => other.value_type().to_string(),
    }
}

/// One value in a line: numbers as they are, strings quoted and cut, arrays abbreviated.
pub fn value_summary(v: &GgufValue) -> String {
    match v {
        GgufValue::U8(x) => x.to_string(),
        GgufValue::I8(x) => x.to_string(),
        GgufValue::U16(x) => x.to_string(),
        GgufValue::I16(x) => x.to_string(),
        GgufValue::U32(x) => x.to_string(),
        GgufValue::I32(x) => x.to_string(),
        GgufValue::U64(x) => x.to_string(),
        GgufValue::I64(x) => x.to_string(),
        GgufValue::F32(x) => float(f64::from(*x)),
        GgufValue::F64(x) => float(*x),
        GgufValue::Bool(x) => x.to_string(),
        GgufValue::String(s) => short_string(s),
        GgufValue::Array(a) => array_summary(a),
    }
}

/// A float as written, in exponent form when plain digits would be long.
fn float(x: f64) -> String {
    if x != 0.0 && x.is_finite() && !(1e-4..1e15).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

/// Bytes with a binary unit.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// The summary: version, dialect and why, layout, every metadata key with its type and
/// value (long arrays and strings abbreviated), and every tensor with type, shape and bytes.
pub fn inspect(header: &GgufHeader) -> String {
    let mut s = String::new();
    let md = header.metadata();
    let _ =
        writeln!(s, "GGUF v{} file {} ({})", header.version(), header.file(), human_bytes(header.file_len()));
    let _ = writeln!(s, "dialect: {} ({})", header.dialect(), header.dialect_reason());
    let _ = writeln!(s, "alignment: {}, data section at offset {}", header.alignment(), header.data_offset());
    let _ = writeln!(s, "metadata: {} keys", md.len());
    let width = md.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in md.iter() {
        let _ = writeln!(s, "  {key:<width$}  {:<18} {}", type_summary(value), value_summary(value));
    }
    let total: u64 = header.tensors().iter().map(|t| t.n_bytes()).sum();
    let params: u64 = header.tensors().iter().map(|t| t.n_elements()).sum();
    let _ =
        writeln!(s, "tensors: {} ({} parameters, {})", header.tensors().len(), params, human_bytes(total));
    let width = header.tensors().iter().map(|t| t.name().len()).max().unwrap_or(0);
    for t in header.tensors() {
        let shape: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
        let _ = writeln!(
            s,
            "  {:<width$}  {:<7} [{}]  {} bytes at +{}",
            t.name(),
            t.ggml_type().name(),
            shape.join(", "),
            t.n_bytes(),
            t.offset()
        );
    }
    s
}

/// One value as JSON: numbers, bools and strings as they are, an array as its element type,
/// length and first elements (a vocabulary has tens of thousands).
fn value_json(v: &GgufValue) -> Value {
    match v {
        GgufValue::Array(a) => json!({
            "element_type": a.element_type().to_string(),
            "len": a.len(),
            "head": (0..a.len().min(ARRAY_HEAD)).filter_map(|i| a.get(i)).map(|v| value_json(&v)).collect::<Vec<_>>(),
        }),
        GgufValue::String(s) => json!(s),
        GgufValue::Bool(b) => json!(b),
        GgufValue::F32(x) => json!(x),
        GgufValue::F64(x) => json!(x),
        other => {
            other.as_i64().map(Value::from).or_else(|| other.as_u64().map(Value::from)).unwrap_or(Value::Null)
        }
    }
}

/// [`inspect`] as JSON: the same facts, every metadata value with its type, every tensor with
/// its type, shape (ggml order), bytes and offset in the data section.
pub fn inspect_json(header: &GgufHeader) -> Value {
    let md = header.metadata();
    let metadata: serde_json::Map<String, Value> = md
        .iter()
        .map(|(k, v)| (k.to_string(), json!({"type": type_summary(v), "value": value_json(v)})))
        .collect();
    let tensors: Vec<Value> = header
        .tensors()
        .iter()
        .map(|t| {
            json!({"name": t.name(), "type": t.ggml_type().name(), "shape": t.shape(),
                   "bytes": t.n_bytes(), "offset": t.offset()})
        })
        .collect();
    json!({
        "file": header.file(),
        "format": "gguf",
        "version": header.version(),
        "file_bytes": header.file_len(),
        "dialect": header.dialect().to_string(),
        "dialect_reason": header.dialect_reason(),
        "alignment": header.alignment(),
        "data_offset": header.data_offset(),
        "parameters": header.tensors().iter().map(|t| t.n_elements()).sum::<u64>(),
        "bytes": header.tensors().iter().map(|t| t.n_bytes()).sum::<u64>(),
        "metadata": metadata,
        "tensors": tensors,
    })
}
