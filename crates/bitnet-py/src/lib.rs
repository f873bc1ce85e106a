//! `bitnet`: the BitNet b1.58 engine from Python.
//!
//! One module, built by maturin from this crate (`pip install ./crates/bitnet-py`): `model`
//! (`Model`, `Tokenizer`), `generation` (`Generation`, `TextStream`), `tools` (`convert`,
//! `quantize`, `train`), `errors` (`BitNetError` and how engine errors become Python
//! exceptions). The engine works with the GIL released, on threads of its own (`worker`).
//! `bitnet.pyi` beside this crate's Cargo.toml is the module's type stub.

mod args;
mod engine;
mod errors;
mod generation;
mod model;
mod tools;
mod worker;

use pyo3::prelude::*;

/// BitNet b1.58 ternary LLMs from Python, on a Rust engine: load Hugging Face checkpoints or
/// GGUF files (or the small embedded model), generate, chat, read logits, convert, quantize and
/// train.
///
/// >>> import bitnet
/// >>> model = bitnet.Model.load()            # the embedded default model
/// >>> print(model.generate("Once upon a time", max_tokens=32).text)
#[pymodule]
mod bitnet {
    #[pymodule_export]
    use super::errors::BitNetError;
    #[pymodule_export]
    use super::generation::{PyGeneration, TextStream};
    #[pymodule_export]
    use super::model::{PyModel, PyTokenizer};
    #[pymodule_export]
    use super::tools::{convert, quantize, train, PyTrainSummary};

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
