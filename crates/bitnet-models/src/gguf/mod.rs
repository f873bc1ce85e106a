//! GGUF: the container of llama.cpp and bitnet.cpp models.
//!
//! * [`GgufFile`] / [`GgufHeader`]: read v2 and v3 files, memory-mapped, every field checked
//!   against the file (see [`reader`] for the layout and checks);
//! * [`GgufWriter`]: write a file tensor by tensor into a temporary file renamed into place;
//! * [`Dialect`]: the numberings of tensor types (upstream llama.cpp, bitnet.cpp, PrismML),
//!   and the rule that tells them apart (see [`dialect`]);
//! * [`tokenizer`]: a `tokenizers::Tokenizer` built from the vocabulary in the metadata;
//! * [`inspect()`], [`inspect_json()`]: a readable summary, and the same as JSON.
//!
//! The block formats of the tensor data are in `bitnet_quant::formats`.

pub mod dialect;
mod error;
mod inspect;
pub mod reader;
pub mod tokenizer;
mod value;
pub mod writer;

pub use dialect::{type_from_id, type_id, Dialect};
pub use error::GgufError;
pub use inspect::{inspect, inspect_json, value_summary};
pub use reader::{GgufFile, GgufHeader, TensorInfo, DEFAULT_ALIGNMENT, KEY_ALIGNMENT};
pub use value::{GgufArray, GgufMetadata, GgufValue, GgufValueType};
pub use writer::{write_gguf, GgufWriter, TensorSpec, WriterOptions};

impl GgufFile {
    /// [`inspect()`] of this file.
    pub fn inspect(&self) -> String {
        inspect(self.header())
    }

    /// [`inspect_json()`] of this file.
    pub fn inspect_json(&self) -> serde_json::Value {
        inspect_json(self.header())
    }
}
