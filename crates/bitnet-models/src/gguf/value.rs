//! GGUF metadata values and the ordered key/value map of a file.

use std::collections::HashMap;
use std::fmt;

/// The type tag of a metadata value, as stored (a `u32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    /// The type of tag `id`, or `None` for an unknown tag.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    /// The fewest bytes one value of this type takes in a file: a string is at least its
    /// 8-byte length, an array at least its 4-byte element type and 8-byte count. Used to
    /// reject counts that could not fit in what is left of the file before allocating.
    pub fn min_encoded_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value: all elements of one type. Arrays of arrays hold each inner array with its
/// own element type, as the format does.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        use GgufValue as V;
        match self {
            V::U8(_) => GgufValueType::U8,
            V::I8(_) => GgufValueType::I8,
            V::U16(_) => GgufValueType::U16,
            V::I16(_) => GgufValueType::I16,
            V::U32(_) => GgufValueType::U32,
            V::I32(_) => GgufValueType::I32,
            V::F32(_) => GgufValueType::F32,
            V::Bool(_) => GgufValueType::Bool,
            V::String(_) => GgufValueType::String,
            V::Array(_) => GgufValueType::Array,
            V::U64(_) => GgufValueType::U64,
            V::I64(_) => GgufValueType::I64,
            V::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer value that fits `u64` (files disagree on whether ids are u32 or i32).
    pub fn as_u64(&self) -> Option<u64> {
        use GgufValue as V;
        match *self {
            V::U8(v) => Some(v.into()),
            V::U16(v) => Some(v.into()),
            V::U32(v) => Some(v.into()),
            V::U64(v) => Some(v),
            V::I8(v) => u64::try_from(v).ok(),
            V::I16(v) => u64::try_from(v).ok(),
            V::I32(v) => u64::try_from(v).ok(),
            V::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        use GgufValue as V;
        match *self {
            V::I8(v) => Some(v.into()),
            V::I16(v) => Some(v.into()),
            V::I32(v) => Some(v.into()),
            V::I64(v) => Some(v),
            V::U8(v) => Some(v.into()),
            V::U16(v) => Some(v.into()),
            V::U32(v) => Some(v.into()),
            V::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any numeric value as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl GgufArray {
    /// The type of the elements.
    pub fn element_type(&self) -> GgufValueType {
        use GgufArray as A;
        match self {
            A::U8(_) => GgufValueType::U8,
            A::I8(_) => GgufValueType::I8,
            A::U16(_) => GgufValueType::U16,
            A::I16(_) => GgufValueType::I16,
            A::U32(_) => GgufValueType::U32,
            A::I32(_) => GgufValueType::I32,
            A::F32(_) => GgufValueType::F32,
            A::Bool(_) => GgufValueType::Bool,
            A::String(_) => GgufValueType::String,
            A::Array(_) => GgufValueType::Array,
            A::U64(_) => GgufValueType::U64,
            A::I64(_) => GgufValueType::I64,
            A::F64(_) => GgufValueType::F64,
        }
    }

    pub fn len(&self) -> usize {
        use GgufArray as A;
        match self {
            A::U8(v) => v.len(),
            A::I8(v) => v.len(),
            A::U16(v) => v.len(),
            A::I16(v) => v.len(),
            A::U32(v) => v.len(),
            A::I32(v) => v.len(),
            A::F32(v) => v.len(),
            A::Bool(v) => v.len(),
            A::String(v) => v.len(),
            A::Array(v) => v.len(),
            A::U64(v) => v.len(),
            A::I64(v) => v.len(),
            A::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a scalar value (an inner array is cloned).
    pub fn get(&self, i: usize) -> Option<GgufValue> {
        use GgufArray as A;
        use GgufValue as V;
        Some(match self {
            A::U8(v) => V::U8(*v.get(i)?),
            A::I8(v) => V::I8(*v.get(i)?),
            A::U16(v) => V::U16(*v.get(i)?),
            A::I16(v) => V::I16(*v.get(i)?),
            A::U32(v) => V::U32(*v.get(i)?),
            A::I32(v) => V::I32(*v.get(i)?),
            A::F32(v) => V::F32(*v.get(i)?),
            A::Bool(v) => V::Bool(*v.get(i)?),
            A::String(v) => V::String(v.get(i)?.clone()),
            A::Array(v) => V::Array(v.get(i)?.clone()),
            A::U64(v) => V::U64(*v.get(i)?),
            A::I64(v) => V::I64(*v.get(i)?),
            A::F64(v) => V::F64(*v.get(i)?),
        })
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            GgufArray::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i32s(&self) -> Option<&[i32]> {
        match self {
            GgufArray::I32(v) => Some(v),
            _ => None,
        }
    }
}

/// The metadata of a GGUF file: keys in file order, each once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GgufMetadata {
    entries: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
}

impl GgufMetadata {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key`, replacing its value in place if it exists, else appending it.
    pub fn insert(&mut self, key: impl Into<String>, value: GgufValue) {
        let key = key.into();
        match self.index.get(&key) {
            Some(&i) => self.entries[i].1 = value,
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
            }
        }
    }

    /// Removes `key`, keeping the order of the others.
    pub fn remove(&mut self, key: &str) -> Option<GgufValue> {
        let i = self.index.remove(key)?;
        let (_, v) = self.entries.remove(i);
        for idx in self.index.values_mut() {
            if *idx > i {
                *idx -= 1;
            }
        }
        Some(v)
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    pub fn get_array(&self, key: &str) -> Option<&GgufArray> {
        self.get(key)?.as_array()
    }

    /// `(key, value)` in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl From<u8> for GgufValue {
    fn from(v: u8) -> Self {
        GgufValue::U8(v)
    }
}
impl From<i8> for GgufValue {
    fn from(v: i8) -> Self {
        GgufValue::I8(v)
    }
}
impl From<u16> for GgufValue {
    fn from(v: u16) -> Self {
        GgufValue::U16(v)
    }
}
impl From<i16> for GgufValue {
    fn from(v: i16) -> Self {
        GgufValue::I16(v)
    }
}
impl From<u32> for GgufValue {
    fn from(v: u32) -> Self {
        GgufValue::U32(v)
    }
}
impl From<i32> for GgufValue {
    fn from(v: i32) -> Self {
        GgufValue::I32(v)
    }
}
impl From<f32> for GgufValue {
    fn from(v: f32) -> Self {
        GgufValue::F32(v)
    }
}
impl From<bool> for GgufValue {
    fn from(v: bool) -> Self {
        GgufValue::Bool(v)
    }
}
impl From<&str> for GgufValue {
    fn from(v: &str) -> Self {
        GgufValue::String(v.to_owned())
    }
}
impl From<String> for GgufValue {
    fn from(v: String) -> Self {
        GgufValue::String(v)
    }
}
impl From<GgufArray> for GgufValue {
    fn from(v: GgufArray) -> Self {
        GgufValue::Array(v)
    }
}
impl From<u64> for GgufValue {
    fn from(v: u64) -> Self {
        GgufValue::U64(v)
    }
}
impl From<i64> for GgufValue {
    fn from(v: i64) -> Self {
        GgufValue::I64(v)
    }
}
impl From<f64> for GgufValue {
    fn from(v: f64) -> Self {
        GgufValue::F64(v)
    }
}
