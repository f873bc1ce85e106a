//! `bitnet.Model` and `bitnet.Tokenizer`.

use std::path::PathBuf;
use std::sync::Arc;

use bitnet_inference::chat::ChatFormat;
use bitnet_inference::{GenerateOptions, HeadFormat};
use bitnet_models::chat::ChatMessage;
use bitnet_models::tokenizer::Tokenizer;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::args::{self, Sampling};
use crate::engine::{Engine, Pool, Source};
use crate::errors::{engine_error, inference_error, require_exists, value_error};
use crate::generation::Request;

/// A BitNet b1.58 model loaded for inference on the CPU.
///
/// The weights are shared and never change: one `Model` serves any number of Python threads at
/// once, each call working in a context (activations, KV cache) of its own. The GIL is
/// released while the engine works, and Ctrl-C stops a generation cleanly.
#[pyclass(frozen, module = "bitnet", name = "Model")]
pub struct PyModel {
    engine: Arc<Engine>,
}

/// Whether the decode governor runs (`BITNET_DECODE_GOVERNOR=off` turns it off, as for the CLI).
fn governor_enabled() -> bool {
    std::env::var("BITNET_DECODE_GOVERNOR").map_or(true, |v| v != "off")
}

fn head_format(lm_head: Option<&str>) -> PyResult<HeadFormat> {
    match lm_head {
        None | Some("float") => Ok(HeadFormat::Float),
        Some("int8") => Ok(HeadFormat::Int8),
        Some("int6") => Ok(HeadFormat::Int6),
        Some(other) => {
            Err(value_error(format!("lm_head must be None, \"float\", \"int8\" or \"int6\", got {other:?}")))
        }
    }
}

fn head_name(h: HeadFormat) -> &'static str {
    match h {
        HeadFormat::Float => "float",
        HeadFormat::Int8 => "int8",
        HeadFormat::Int6 => "int6",
    }
}

impl PyModel {
    fn require_tokenizer(&self) -> PyResult<Arc<Tokenizer>> {
        self.engine.tokenizer.clone().ok_or_else(|| {
            engine_error(format!(
                "{} has no tokenizer: give token ids, not text (and generation cannot decode its output)",
                self.engine.source
            ))
        })
    }

    fn chat_format(&self) -> PyResult<&ChatFormat> {
        self.engine.chat.as_ref().map_err(|why| engine_error(format!("no usable chat template: {why}")))
    }

    /// Prompt ids from a `str` (encoded with the tokenizer, BOS added as it says) or from ids.
    fn prompt_ids(&self, prompt: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<u32>> {
        match prompt.cast::<PyString>() {
            Ok(text) => {
                let text = text.to_cow()?;
                if text.is_empty() {
                    return Err(value_error(format!("{name} is empty: give some text or token ids")));
                }
                self.require_tokenizer()?.encode(&text).map_err(engine_error)
            }
            Err(_) => args::token_ids(name, prompt),
        }
    }

    /// Checks a prompt and the request's options and makes the request.
    fn request(
        &self,
        ids: Vec<u32>,
        max_tokens: i64,
        sampling: &Sampling,
        eos_ids: Vec<u32>,
        stop_strings: Vec<String>,
    ) -> PyResult<Request> {
        let max_tokens = args::count("max_tokens", max_tokens)?;
        let sampling = sampling.params()?;
        self.require_tokenizer()?;
        self.engine.check_prompt(&ids, 1).map_err(value_error)?;
        // As the CLI: at most what is left of the context after the prompt.
        let max_new_tokens = max_tokens.min(self.engine.context_length() - ids.len());
        let opts = GenerateOptions { max_new_tokens, sampling, eos_ids, stop_strings };
        Ok(Request { engine: self.engine.clone(), ids, opts })
    }

    fn run(py: Python<'_>, request: Request, stream: bool) -> PyResult<Py<PyAny>> {
        if stream {
            Ok(Py::new(py, request.start_stream()?)?.into_any())
        } else {
            Ok(Py::new(py, request.run_to_end(py)?)?.into_any())
        }
    }
}

#[pymethods]
impl PyModel {
    /// Loads a model.
    ///
    /// path: a Hugging Face checkpoint folder (config.json, model.safetensors or shards,
    ///     tokenizer.json) or a .gguf file; None loads the small model embedded in the library.
    /// device: "cpu" (the only device of this build).
    /// threads: threads the engine computes with; None uses every core. As the CLI's -t, the
    ///     first Model.load sets the process's thread pool; a model loaded later with another
    ///     count gets threads of its own.
    /// lm_head: how the output head is stored: None or "float" as in the checkpoint (exact
    ///     logits), "int8" (faster decoding, logits within about 1 %) or "int6".
    ///
    /// Raises FileNotFoundError if path does not exist, ValueError for a bad argument and
    /// BitNetError if the checkpoint cannot be read.
    #[staticmethod]
    #[pyo3(signature = (path=None, device="cpu", threads=None, lm_head=None))]
    fn load(
        py: Python<'_>,
        path: Option<PathBuf>,
        device: &str,
        threads: Option<i64>,
        lm_head: Option<&str>,
    ) -> PyResult<Self> {
        if device != "cpu" {
            return Err(value_error(format!(
                "device {device:?} is not available: this build of bitnet runs on \"cpu\" only"
            )));
        }
        let threads = threads.map(|n| args::positive("threads", n)).transpose()?;
        let head = head_format(lm_head)?;
        let source = match path {
            None => Source::Embedded,
            Some(path) => {
                require_exists(&path, "model path")?;
                Source::Path(path)
            }
        };
        let governor = governor_enabled();
        let engine = py
            .detach(|| Engine::load(&source, head, Pool::for_threads(threads), governor))
            .map_err(inference_error)?;
        Ok(Self { engine: Arc::new(engine) })
    }

    /// Generates text after a prompt.
    ///
    /// prompt: text (encoded with the model's tokenizer, BOS added as it says) or token ids.
    /// max_tokens: new tokens at most (fewer if the context fills up).
    /// temperature: 0 is greedy (argmax); above 0 samples.
    /// top_k, top_p, min_p: keep the k likeliest tokens (0: all), the smallest set reaching
    ///     probability top_p (1: all), tokens at least min_p times the likeliest one (0: all).
    /// repeat_penalty: transformers' repetition penalty (1: off).
    /// seed: the sampler's seed.
    /// stop: a string or strings that end the generation; the text is cut before them.
    /// stream: False returns a Generation when done; True returns a TextStream, an iterator
    ///     over the text as it is generated.
    ///
    /// Generation ends at an end-of-sequence token of the model, a stop string, or max_tokens.
    #[pyo3(signature = (
        prompt, *, max_tokens=128, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
        repeat_penalty=1.0, seed=0, stop=None, stream=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repeat_penalty: f64,
        seed: i128,
        stop: Option<&Bound<'_, PyAny>>,
        stream: bool,
    ) -> PyResult<Py<PyAny>> {
        let sampling = Sampling { temperature, top_k, top_p, min_p, repeat_penalty, seed };
        let ids = self.prompt_ids(prompt, "prompt")?;
        let eos = self.engine.model.config.eos_token_ids.clone();
        let request = self.request(ids, max_tokens, &sampling, eos, args::stop_strings(stop)?)?;
        Self::run(py, request, stream)
    }

    /// Replies to a conversation, rendered with the checkpoint's chat template.
    ///
    /// messages: a list of {"role": ..., "content": ...} dicts ("system", "user",
    ///     "assistant", ...). The prompt is what transformers' apply_chat_template(messages,
    ///     add_generation_prompt=True, tokenize=True) gives; a checkpoint without a template
    ///     uses a plain "Role: content" format (see chat_template).
    /// The other arguments are generate()'s. Generation also ends at the template's
    /// end-of-turn tokens.
    #[pyo3(signature = (
        messages, *, max_tokens=128, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
        repeat_penalty=1.0, seed=0, stop=None, stream=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        max_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repeat_penalty: f64,
        seed: i128,
        stop: Option<&Bound<'_, PyAny>>,
        stream: bool,
    ) -> PyResult<Py<PyAny>> {
        let sampling = Sampling { temperature, top_k, top_p, min_p, repeat_penalty, seed };
        let messages = args::messages(messages)?;
        let (format, tokenizer) = (self.chat_format()?, self.require_tokenizer()?);
        let (_, ids) = render_chat(format, &tokenizer, &messages, true)?;
        let stop_ids = format.stop_ids.clone();
        let mut stops = args::stop_strings(stop)?;
        stops.extend(format.stop_strings.iter().cloned());
        let request = self.request(ids, max_tokens, &sampling, stop_ids, stops)?;
        Self::run(py, request, stream)
    }

    /// The prompt a conversation becomes, as transformers' apply_chat_template: token ids
    /// (tokenize=True) or the rendered text (tokenize=False).
    #[pyo3(signature = (messages, *, add_generation_prompt=true, tokenize=true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        tokenize: bool,
    ) -> PyResult<Py<PyAny>> {
        let messages = args::messages(messages)?;
        let (format, tokenizer) = (self.chat_format()?, self.require_tokenizer()?);
        let (text, ids) = render_chat(format, &tokenizer, &messages, add_generation_prompt)?;
        Ok(if tokenize {
            ids.into_pyobject(py)?.into_any().unbind()
        } else {
            text.into_pyobject(py)?.into_any().unbind()
        })
    }

    /// The logits (float32) of the last position of token_ids, shape (vocab_size,), or with
    /// all_positions=True of every position, shape (len(token_ids), vocab_size). Bit for bit
    /// what `bitnet logits` prints. token_ids may also be text, encoded with the tokenizer.
    #[pyo3(signature = (token_ids, all_positions=false))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        token_ids: &Bound<'py, PyAny>,
        all_positions: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = self.prompt_ids(token_ids, "token_ids")?;
        self.engine.check_prompt(&ids, 0).map_err(value_error)?;
        let engine = &self.engine;
        let logits = py.detach(|| engine.logits(&ids, all_positions)).map_err(inference_error)?;
        if !all_positions {
            return Ok(PyArray1::from_vec(py, logits).into_any());
        }
        let shape = (ids.len(), self.engine.vocab_size());
        let rows = Array2::from_shape_vec(shape, logits).map_err(engine_error)?;
        Ok(rows.into_pyarray(py).into_any())
    }

    /// The embeddings of texts (a str or a list of str), shape (len(texts), hidden_size),
    /// float32, each row L2-normalized: BitNet-embedding models' last-token pooling, bit for bit
    /// what `bitnet embed` prints. A checkpoint that declares another pooling raises ValueError.
    fn embed<'py>(&self, py: Python<'py>, texts: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let texts: Vec<String> = match texts.cast::<PyString>() {
            Ok(one) => vec![one.to_cow()?.into_owned()],
            Err(_) => texts
                .extract()
                .map_err(|_| value_error("texts must be a str or a list of str".to_string()))?,
        };
        if texts.is_empty() {
            return Err(value_error("texts is empty: give at least one text".to_string()));
        }
        let source = std::path::Path::new(&self.engine.source);
        if source.exists() {
            use bitnet_models::pooling::{declared_pooling, Pooling};
            match declared_pooling(source).map_err(engine_error)? {
                None | Some(Pooling::LastToken) => {}
                Some(other) => {
                    return Err(value_error(format!(
                        "{} declares {other} pooling; embed pools the last token (BitNet-embedding models)",
                        self.engine.source
                    )))
                }
            }
        }
        let tokenizer = self.require_tokenizer()?;
        let mut ids = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            if text.is_empty() {
                return Err(value_error(format!("texts[{i}] is empty: nothing to embed")));
            }
            let t = tokenizer.encode(text).map_err(engine_error)?;
            self.engine.check_prompt(&t, 0).map_err(|e| value_error(format!("texts[{i}]: {e}")))?;
            ids.push(t);
        }
        let engine = &self.engine;
        let vectors = py.detach(|| engine.embed(&ids)).map_err(inference_error)?;
        let hidden = vectors.first().map_or(0, Vec::len);
        let rows = Array2::from_shape_vec((vectors.len(), hidden), vectors.concat()).map_err(engine_error)?;
        Ok(rows.into_pyarray(py).into_any())
    }

    /// The model's tokenizer, or None if the checkpoint has none.
    #[getter]
    fn tokenizer(&self) -> Option<PyTokenizer> {
        self.engine.tokenizer.clone().map(|inner| PyTokenizer { inner })
    }

    /// The Jinja source of the checkpoint's chat template; None when it has none and chat()
    /// uses the plain "Role: content" fallback.
    #[getter(chat_template)]
    fn chat_template_source(&self) -> Option<String> {
        match &self.engine.chat {
            Ok(f) if !f.is_fallback() => Some(f.template.source().to_owned()),
            _ => None,
        }
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.engine.vocab_size()
    }

    /// The most tokens a prompt and its generation may hold together.
    #[getter]
    fn context_length(&self) -> usize {
        self.engine.context_length()
    }

    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.engine.model.config.bos_token_id
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.engine.model.config.eos_token_ids.clone()
    }

    /// The folder or file the model was loaded from ("<embedded default model>" for the default).
    #[getter]
    fn source(&self) -> String {
        self.engine.source.clone()
    }

    /// Threads each call computes with.
    #[getter]
    fn threads(&self) -> usize {
        self.engine.pool.threads()
    }

    /// How the lm_head is stored: "float", "int8" or "int6".
    #[getter]
    fn lm_head(&self) -> &'static str {
        head_name(self.engine.head)
    }

    fn __repr__(&self) -> String {
        let c = &self.engine.model.config;
        format!(
            "<bitnet.Model {:?}: {:?}, vocab {}, hidden {}, {} layers, {} threads>",
            self.engine.source,
            c.architecture,
            c.vocab_size,
            c.hidden_size,
            c.num_layers,
            self.engine.pool.threads()
        )
    }
}

/// A conversation's rendered text and prompt ids, as transformers' apply_chat_template makes them.
fn render_chat(
    format: &ChatFormat,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> PyResult<(String, Vec<u32>)> {
    format
        .render_and_encode(tokenizer, messages, add_generation_prompt)
        .map_err(|e| engine_error(e.to_string()))
}

/// A model's tokenizer (its tokenizer.json, or the vocabulary of its GGUF file).
#[pyclass(frozen, module = "bitnet", name = "Tokenizer")]
pub struct PyTokenizer {
    inner: Arc<Tokenizer>,
}

#[pymethods]
impl PyTokenizer {
    /// Token ids of text. add_special_tokens=True adds what the tokenizer's template adds
    /// (BOS), as `bitnet generate --prompt` does; False encodes the text as it stands
    /// (special tokens written in it are still recognized).
    #[pyo3(signature = (text, add_special_tokens=true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let tok = &self.inner;
        let ids = py.detach(|| match add_special_tokens {
            true => tok.encode(text),
            false => tok.encode_without_special_tokens(text),
        });
        ids.map_err(engine_error)
    }

    /// Text of token ids, special tokens left out.
    fn decode(&self, py: Python<'_>, token_ids: &Bound<'_, PyAny>) -> PyResult<String> {
        let ids = args::token_ids("token_ids", token_ids)?;
        let tok = &self.inner;
        py.detach(|| tok.decode(&ids)).map_err(engine_error)
    }

    /// The id of a token string, or None if the vocabulary has no such token.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokens in the vocabulary, added tokens included.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn __repr__(&self) -> String {
        format!("<bitnet.Tokenizer of {} tokens>", self.inner.vocab_size())
    }
}
