//! Chat templates: a conversation turned into the prompt text an instruct model was trained on.
//!
//! A checkpoint ships its prompt format as a Jinja template, and transformers'
//! `apply_chat_template` is the reference for what it renders. [`ChatTemplate`] runs the same
//! templates through MiniJinja, set up the way transformers sets up Jinja2:
//!
//! * `trim_blocks` and `lstrip_blocks` on, `keep_trailing_newline` off, no HTML escaping;
//! * `break`/`continue` in loops, `namespace()`, Python's `str`/`dict` methods (`.strip()`,
//!   `.startswith()`, `.split()`, `.items()` ... from `minijinja-contrib`'s pycompat);
//! * `raise_exception(msg)` (a [`ChatError::Raised`] carrying `msg`), `strftime_now(fmt)` (the local
//!   time, or [`RenderOptions::now`]), and a `tojson` filter that writes what Python's
//!   `json.dumps(x, ensure_ascii=False)` writes (the filter transformers installs), with its
//!   `indent`, `separators`, `sort_keys` and `ensure_ascii` arguments;
//! * the variables `messages`, `add_generation_prompt`, `tools` and `documents` (none), the special
//!   tokens the checkpoint names (`bos_token`, `eos_token`, `unk_token`, `pad_token`; one that is
//!   not named stays undefined, as in transformers), and `enable_thinking` (Qwen3) only when the
//!   caller sets it.
//!
//! Where the template comes from:
//!
//! * a checkpoint folder ([`ChatTemplate::from_checkpoint_dir`]): `chat_template.jinja` if present
//!   (transformers saves it there and prefers it), else `tokenizer_config.json`'s `chat_template`,
//!   a string or a list of named templates (`[{"name": "default", "template": ...}, ...]`, the
//!   one named `default` is used). The token strings come from `tokenizer_config.json`
//!   (`"bos_token": "<s>"` or `{"content": "<s>", ...}`), else from `special_tokens_map.json`;
//! * GGUF metadata ([`ChatTemplate::from_gguf`]): `tokenizer.chat_template`, the token strings
//!   looked up in `tokenizer.ggml.tokens` at `tokenizer.ggml.{bos,eos,unknown,padding}_token_id`;
//!   the `eot`/`eom` ids, when present, are also end-of-turn tokens (llama.cpp stops on them);
//! * **the plain fallback** ([`ChatTemplate::fallback`]) for checkpoints that have no template (a
//!   base model, this repository's default model):
//!
//!   ```text
//!   System: You are terse.
//!   User: Hi!
//!   Assistant: Hello.
//!   User: Who are you?
//!   Assistant:
//!   ```
//!
//!   one line `Role: content` per message (the role capitalized, the content trimmed), then
//!   `Assistant:` when a reply is wanted. [`ChatTemplate::is_fallback`] tells the caller to say so
//!   to the user: a model that never saw this format may answer poorly. The fallback emits no
//!   special tokens, so [`ChatTemplate::needs_bos`] asks for BOS in front, and
//!   [`ChatTemplate::stop_sequences`] gives `"\nUser:"` to cut a reply that runs on into the next
//!   turn.
//!
//! Tokenizing: transformers' `apply_chat_template(tokenize=True)` encodes the rendered text with
//! `add_special_tokens=False`: a model's template is the sole author of its special tokens
//! (Llama 3's and BitNet's emit `bos_token` themselves). So the prompt ids are
//! `[BOS if template.needs_bos(&text)] + tokenizer.encode_without_special_tokens(&text)`.
//!
//! Bad templates are errors, never panics: a syntax error, an unknown function or filter, a type
//! error and `raise_exception` all come back as a [`ChatError`] naming where the template came
//! from. A render has a fuel budget (instructions and bytes, see [`fuel_budget`]) so that a
//! template that loops forever or builds gigabytes fails instead.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, State, Value};
use serde::{Deserialize, Serialize};

use crate::gguf::{GgufArray, GgufFile, GgufMetadata, GgufValue};

/// The Jinja source of the plain fallback (see the module documentation).
pub const FALLBACK_TEMPLATE: &str = include_str!("chat_fallback.jinja");

/// The name the compiled template has inside MiniJinja (it appears in its error locations).
const TEMPLATE_NAME: &str = "chat_template";

/// Strings that end an assistant turn in the templates of common model families. One counts
/// for a template only when its source contains it (or it is the template's EOS token).
pub const END_OF_TURN_MARKERS: &[&str] = &[
    "<|eot_id|>",            // Llama 3, BitNet b1.58 2B4T
    "<|eom_id|>",            // Llama 3.1: end of a message that calls a tool
    "<|im_end|>",            // ChatML: Qwen, SmolLM
    "<|end_of_text|>",       // Llama 3 base
    "<|endoftext|>",         // GPT-2 family, Falcon 3
    "</s>",                  // Llama 2, Mistral
    "<|end|>",               // Phi-3
    "<end_of_turn>",         // Gemma
    "<|end_of_turn|>",       // OpenChat
    "<|END_OF_TURN_TOKEN|>", // Command-R
];

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever else the template understands).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Reads a JSON array of `{"role": string, "content": string}` objects (a request body's
/// `messages`), with an error that names the message and what is wrong with it.
pub fn messages_from_json(value: &serde_json::Value) -> Result<Vec<ChatMessage>, ChatError> {
    let list = value.as_array().ok_or_else(|| ChatError::BadMessage {
        index: None,
        reason: format!("messages must be an array, got {}", json_kind(value)),
    })?;
    list.iter()
        .enumerate()
        .map(|(index, message)| {
            let bad = |reason: String| ChatError::BadMessage { index: Some(index), reason };
            let object = message
                .as_object()
                .ok_or_else(|| bad(format!("a message must be an object, got {}", json_kind(message))))?;
            let field = |name: &str| match object.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(bad(format!("'{name}' must be a string, got {}", json_kind(other)))),
                None => Err(bad(format!("'{name}' is missing"))),
            };
            Ok(ChatMessage { role: field("role")?, content: field("content")? })
        })
        .collect()
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The special-token strings a template may use. A token that is `None` is left undefined in
/// the template, as transformers leaves a token the tokenizer does not have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatSpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
}

/// Where a template came from; errors name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// `chat_template` of this `tokenizer_config.json`.
    TokenizerConfig(PathBuf),
    /// A template file (`chat_template.jinja`, or one the user named).
    File(PathBuf),
    /// `tokenizer.chat_template` of this GGUF file.
    Gguf(String),
    /// The built-in plain fallback.
    Fallback,
    /// A template given as a string; the text says what it is.
    Inline(String),
}

impl fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateOrigin::TokenizerConfig(path) => write!(f, "{} (chat_template)", path.display()),
            TemplateOrigin::File(path) => write!(f, "{}", path.display()),
            TemplateOrigin::Gguf(file) => write!(f, "{file} (tokenizer.chat_template)"),
            TemplateOrigin::Fallback => f.write_str("the built-in plain chat template"),
            TemplateOrigin::Inline(name) => f.write_str(name),
        }
    }
}

/// What can go wrong finding, parsing or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file or metadata that holds the template (or its tokens) is malformed.
    #[error("{origin}: {message}")]
    Config { origin: String, message: String },
    /// The template does not parse.
    #[error("chat template from {origin}: {detail}")]
    Syntax { origin: String, line: Option<usize>, detail: String },
    /// The template called `raise_exception(message)`: it refuses this conversation.
    #[error("chat template from {origin} refused the conversation: {message}")]
    Raised { origin: String, message: String },
    /// Rendering failed: an unknown function or filter, a type error, an undefined value used,
    /// the fuel budget spent.
    #[error("chat template from {origin}: {detail}")]
    Render { origin: String, line: Option<usize>, detail: String },
    /// A message that is not `{"role": string, "content": string}`.
    #[error("{}{reason}", index.map(|i| format!("message {i}: ")).unwrap_or_default())]
    BadMessage { index: Option<usize>, reason: String },
}

/// How to render, beyond the messages.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// End with the header of an assistant turn, so that the model writes the reply.
    pub add_generation_prompt: bool,
    /// Qwen3's `enable_thinking`; `None` leaves it undefined (the template's default).
    pub enable_thinking: Option<bool>,
    /// The time `strftime_now` formats (in the local time zone); `None` is the time of the call.
    pub now: Option<SystemTime>,
}

/// A chat template ready to render: its source, compiled, and the token strings it uses.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    tokens: ChatSpecialTokens,
    /// End-of-turn token strings named outside the template (GGUF `eot`/`eom` ids).
    extra_end_of_turn: Vec<String>,
    origin: TemplateOrigin,
    env: Environment<'static>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("tokens", &self.tokens)
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported now, naming `origin`.
    pub fn new(
        source: impl Into<String>,
        tokens: ChatSpecialTokens,
        origin: TemplateOrigin,
    ) -> Result<Self, ChatError> {
        let source = source.into();
        let env = compile(&source, &origin)?;
        Ok(Self { source, tokens, extra_end_of_turn: Vec::new(), origin, env })
    }

    /// The plain fallback (see the module documentation) with the checkpoint's tokens.
    pub fn fallback(tokens: ChatSpecialTokens) -> Result<Self, ChatError> {
        Self::new(FALLBACK_TEMPLATE, tokens, TemplateOrigin::Fallback)
    }

    /// The template of a Hugging Face checkpoint folder; `None` when it has none.
    pub fn from_checkpoint_dir(dir: &Path) -> Result<Option<Self>, ChatError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        let tokens = checkpoint_tokens(dir, config.as_ref(), &config_path)?;

        let jinja_path = dir.join("chat_template.jinja");
        if let Some(source) = read_text_if_exists(&jinja_path)? {
            return Self::new(source, tokens, TemplateOrigin::File(jinja_path)).map(Some);
        }
        let Some(config) = config else { return Ok(None) };
        match tokenizer_config_template(&config, &config_path)? {
            Some(source) => Self::new(source, tokens, TemplateOrigin::TokenizerConfig(config_path)).map(Some),
            None => Ok(None),
        }
    }

    /// [`ChatTemplate::from_checkpoint_dir`], or the plain fallback when the folder has no
    /// template ([`ChatTemplate::is_fallback`] then says so).
    pub fn from_checkpoint_dir_or_fallback(dir: &Path) -> Result<Self, ChatError> {
        if let Some(template) = Self::from_checkpoint_dir(dir)? {
            return Ok(template);
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        Self::fallback(checkpoint_tokens(dir, config.as_ref(), &config_path)?)
    }

    /// The template in a GGUF file's metadata; `None` when it has none.
    pub fn from_gguf(file: &GgufFile) -> Result<Option<Self>, ChatError> {
        Self::from_gguf_metadata(file.metadata(), file.file())
    }

    /// [`ChatTemplate::from_gguf`], or the plain fallback with the file's tokens.
    pub fn from_gguf_or_fallback(file: &GgufFile) -> Result<Self, ChatError> {
        Self::from_gguf_metadata_or_fallback(file.metadata(), file.file())
    }

    /// The template in GGUF metadata; `file` names it in errors.
    pub fn from_gguf_metadata(md: &GgufMetadata, file: &str) -> Result<Option<Self>, ChatError> {
        let gguf = GgufTokens { md, file };
        let Some(source) = gguf.string(KEY_CHAT_TEMPLATE)? else { return Ok(None) };
        let mut template = Self::new(source, gguf.special_tokens()?, TemplateOrigin::Gguf(file.to_owned()))?;
        template.extra_end_of_turn = gguf.end_of_turn_tokens()?;
        Ok(Some(template))
    }

    /// [`ChatTemplate::from_gguf_metadata`], or the plain fallback with the file's tokens.
    pub fn from_gguf_metadata_or_fallback(md: &GgufMetadata, file: &str) -> Result<Self, ChatError> {
        if let Some(template) = Self::from_gguf_metadata(md, file)? {
            return Ok(template);
        }
        let gguf = GgufTokens { md, file };
        let mut template = Self::fallback(gguf.special_tokens()?)?;
        template.extra_end_of_turn = gguf.end_of_turn_tokens()?;
        Ok(template)
    }

    /// Whether this is the plain fallback, for a checkpoint without a template.
    pub fn is_fallback(&self) -> bool {
        self.origin == TemplateOrigin::Fallback
    }
    pub fn origin(&self) -> &TemplateOrigin {
        &self.origin
    }
    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }
    pub fn special_tokens(&self) -> &ChatSpecialTokens {
        &self.tokens
    }
    pub fn bos_token(&self) -> Option<&str> {
        self.tokens.bos.as_deref()
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.tokens.eos.as_deref()
    }

    /// The prompt text of `messages` (transformers' `apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)`).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        self.render_with(messages, &RenderOptions { add_generation_prompt, ..RenderOptions::default() })
    }

    /// [`ChatTemplate::render`] with every option.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, ChatError> {
        let mut env = self.env.clone();
        env.set_fuel(Some(fuel_budget(messages)));
        let now = options.now;
        env.add_function("strftime_now", move |format: &str| strftime_now(now, format));
        let template = env.get_template(TEMPLATE_NAME).map_err(|e| template_error(&self.origin, e))?;
        template.render(self.context(messages, options)).map_err(|e| template_error(&self.origin, e))
    }

    /// The variables a render sees.
    fn context(&self, messages: &[ChatMessage], options: &RenderOptions) -> Value {
        let mut vars = std::collections::BTreeMap::<String, Value>::new();
        vars.insert("messages".into(), Value::from(Serde(messages)));
        vars.insert("add_generation_prompt".into(), Value::from(options.add_generation_prompt));
        vars.insert("tools".into(), Value::from(()));
        vars.insert("documents".into(), Value::from(()));
        let named = [
            ("bos_token", &self.tokens.bos),
            ("eos_token", &self.tokens.eos),
            ("unk_token", &self.tokens.unk),
            ("pad_token", &self.tokens.pad),
        ];
        for (name, token) in named {
            if let Some(token) = token {
                vars.insert(name.into(), Value::from(token.as_str()));
            }
        }
        if let Some(enable_thinking) = options.enable_thinking {
            vars.insert("enable_thinking".into(), Value::from(enable_thinking));
        }
        Value::from(vars)
    }

    /// Whether the caller must put the BOS token in front of the ids of `rendered`. A model's
    /// template writes its own special tokens (transformers tokenizes its output with
    /// `add_special_tokens=False`), so this is false for every template but the fallback,
    /// which wants BOS unless the text already starts with it.
    pub fn needs_bos(&self, rendered: &str) -> bool {
        self.is_fallback() && !starts_with_bos(rendered, self.bos_token())
    }

    /// The token strings that end an assistant turn: the EOS token, the GGUF `eot`/`eom`
    /// tokens, and those of [`END_OF_TURN_MARKERS`] that the template source writes. The caller
    /// maps them to ids with its tokenizer and stops generating at any of them.
    pub fn end_of_turn_tokens(&self) -> Vec<String> {
        let mut tokens: Vec<String> = Vec::new();
        let mut add = |token: &str| {
            if !token.is_empty() && !tokens.iter().any(|t| t == token) {
                tokens.push(token.to_owned());
            }
        };
        if let Some(eos) = self.eos_token() {
            add(eos);
        }
        for token in &self.extra_end_of_turn {
            add(token);
        }
        for marker in END_OF_TURN_MARKERS {
            if self.source.contains(marker) {
                add(marker);
            }
        }
        tokens
    }

    /// Text that ends a reply when it appears in the output (not a token): `"\nUser:"` for the
    /// fallback, whose turns have no end token; empty for a model's template.
    pub fn stop_sequences(&self) -> Vec<String> {
        if self.is_fallback() {
            vec!["\nUser:".to_owned()]
        } else {
            Vec::new()
        }
    }
}

/// Whether `rendered` already starts with the BOS token `bos` (false when there is none).
pub fn starts_with_bos(rendered: &str, bos: Option<&str>) -> bool {
    matches!(bos, Some(bos) if !bos.is_empty() && rendered.starts_with(bos))
}

/// The fuel one render may spend (see MiniJinja's `set_fuel`: about one unit per instruction
/// and per 64 bytes created): room for any real template on any real conversation, while a
/// template that loops without end, or builds strings without bound, stops after a few
/// seconds and at most a few hundred megabytes.
pub fn fuel_budget(messages: &[ChatMessage]) -> u64 {
    const BASE: u64 = 2_000_000;
    const PER_MESSAGE: u64 = 5_000;
    let text_bytes: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
    BASE + PER_MESSAGE * messages.len() as u64 + text_bytes as u64 / 4
}

/// An environment holding `source` compiled, set up like transformers' Jinja2 sandbox.
fn compile(source: &str, origin: &TemplateOrigin) -> Result<Environment<'static>, ChatError> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .map_err(|e| template_error(origin, e))?;
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", |format: &str| strftime_now(None, format));
    env.add_filter("tojson", python_json::tojson);
    env.set_formatter(python_formatter);
    env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(|e| template_error(origin, e))?;
    Ok(env)
}

/// Prints floats in `{{ ... }}` as Python's `str()` does (`1e+20`, `1e-05`, `nan`, `inf`) where
/// MiniJinja writes every digit; everything else as MiniJinja does, which already spells
/// booleans and none the Python way (`True`, `False`, `None`).
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let is_float = value.kind() == ValueKind::Number && !value.is_integer();
    match f64::try_from(value.clone()) {
        Ok(x) if is_float => {
            let text = match x {
                x if x.is_nan() => "nan".to_owned(),
                x if x.is_infinite() => if x > 0.0 { "inf" } else { "-inf" }.to_owned(),
                x => python_json::python_float_repr(x),
            };
            out.write_str(&text)
                .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write the output"))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// The message a template passed to `raise_exception`, carried through MiniJinja's error as its
/// source so that it can be told apart from the engine's own errors.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

fn raise_exception(message: Value) -> Result<Value, minijinja::Error> {
    let message = match message.as_str() {
        Some(s) => s.to_owned(),
        None => message.to_string(),
    };
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {message}"))
        .with_source(RaisedByTemplate(message)))
}

/// `datetime.now().strftime(format)` (or at `now`), in the local time zone.
fn strftime_now(now: Option<SystemTime>, format: &str) -> Result<String, minijinja::Error> {
    use std::fmt::Write;
    let time: chrono::DateTime<chrono::Local> = now.map(Into::into).unwrap_or_else(chrono::Local::now);
    let mut out = String::new();
    write!(out, "{}", time.format(format)).map_err(|_| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: invalid format {format:?}"))
    })?;
    Ok(out)
}

/// A MiniJinja error as a [`ChatError`] naming the template's origin.
fn template_error(origin: &TemplateOrigin, err: minijinja::Error) -> ChatError {
    let origin_text = origin.to_string();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return ChatError::Raised { origin: origin_text, message: raised.0.clone() };
        }
        source = e.source();
    }
    let line = err.line();
    let detail = err.to_string();
    match err.kind() {
        ErrorKind::SyntaxError | ErrorKind::BadEscape | ErrorKind::InvalidDelimiter => {
            ChatError::Syntax { origin: origin_text, line, detail }
        }
        _ => ChatError::Render { origin: origin_text, line, detail },
    }
}

fn read_text_if_exists(path: &Path) -> Result<Option<String>, ChatError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ChatError::Io { path: path.to_path_buf(), source }),
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>, ChatError> {
    let Some(text) = read_text_if_exists(path)? else { return Ok(None) };
    serde_json::from_str(&text).map(Some).map_err(|e| ChatError::Config {
        origin: path.display().to_string(),
        message: format!("not valid JSON: {e}"),
    })
}

/// `chat_template` of a tokenizer_config.json: a string, or the list-of-named-templates form,
/// of which the one named `default` is used.
fn tokenizer_config_template(config: &serde_json::Value, path: &Path) -> Result<Option<String>, ChatError> {
    let bad = |message: String| ChatError::Config { origin: path.display().to_string(), message };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(named)) => {
            let mut names = Vec::new();
            for (i, entry) in named.iter().enumerate() {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(Some(template.to_owned())),
                    (Some(name), Some(_)) => names.push(name.to_owned()),
                    _ => {
                        return Err(bad(format!(
                            "chat_template[{i}] must be {{\"name\": string, \"template\": string}}"
                        )))
                    }
                }
            }
            Err(bad(format!("chat_template has no template named 'default' (it has: {})", names.join(", "))))
        }
        Some(other) => Err(bad(format!(
            "chat_template must be a string or a list of named templates, got {}",
            json_kind(other)
        ))),
    }
}

/// The special-token strings of a checkpoint: tokenizer_config.json, else special_tokens_map.json.
fn checkpoint_tokens(
    dir: &Path,
    config: Option<&serde_json::Value>,
    config_path: &Path,
) -> Result<ChatSpecialTokens, ChatError> {
    let map_path = dir.join("special_tokens_map.json");
    let map = read_json_if_exists(&map_path)?;
    let token = |name: &str| -> Result<Option<String>, ChatError> {
        if let Some(token) = config.map(|c| token_string(c, name, config_path)).transpose()?.flatten() {
            return Ok(Some(token));
        }
        Ok(map.as_ref().map(|m| token_string(m, name, &map_path)).transpose()?.flatten())
    };
    Ok(ChatSpecialTokens {
        bos: token("bos_token")?,
        eos: token("eos_token")?,
        unk: token("unk_token")?,
        pad: token("pad_token")?,
    })
}

/// A token entry: `"<s>"`, `{"content": "<s>", ...}` (an AddedToken) or null.
fn token_string(json: &serde_json::Value, name: &str, path: &Path) -> Result<Option<String>, ChatError> {
    let bad = |message: String| ChatError::Config { origin: path.display().to_string(), message };
    match json.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(bad(format!("{name} is an object without a string 'content'"))),
        },
        Some(other) => {
            Err(bad(format!("{name} must be a string or {{\"content\": string}}, got {}", json_kind(other))))
        }
    }
}

const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";

/// Reads the template and token strings of GGUF metadata, with errors that name the file.
struct GgufTokens<'a> {
    md: &'a GgufMetadata,
    file: &'a str,
}

impl GgufTokens<'_> {
    fn error(&self, message: String) -> ChatError {
        ChatError::Config { origin: self.file.to_owned(), message }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ChatError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s.clone())),
            Some(other) => {
                Err(self
                    .error(format!("metadata key '{key}' is a {}, expected a string", other.value_type())))
            }
        }
    }

    fn vocabulary(&self) -> Result<Option<&[String]>, ChatError> {
        match self.md.get(KEY_TOKENS) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::String(tokens))) => Ok(Some(tokens)),
            Some(_) => Err(self.error(format!("metadata key '{KEY_TOKENS}' is not an array of strings"))),
        }
    }

    /// The text of the token whose id is at `key`; an id outside the vocabulary names no token
    /// (llama.cpp ignores it too).
    fn token(&self, key: &str) -> Result<Option<String>, ChatError> {
        let Some(value) = self.md.get(key) else { return Ok(None) };
        let id = value.as_i64().ok_or_else(|| {
            self.error(format!("metadata key '{key}' is a {}, expected an integer", value.value_type()))
        })?;
        let Some(tokens) = self.vocabulary()? else { return Ok(None) };
        Ok(usize::try_from(id).ok().and_then(|i| tokens.get(i)).cloned())
    }

    fn special_tokens(&self) -> Result<ChatSpecialTokens, ChatError> {
        Ok(ChatSpecialTokens {
            bos: self.token("tokenizer.ggml.bos_token_id")?,
            eos: self.token("tokenizer.ggml.eos_token_id")?,
            unk: self.token("tokenizer.ggml.unknown_token_id")?,
            pad: self.token("tokenizer.ggml.padding_token_id")?,
        })
    }

    fn end_of_turn_tokens(&self) -> Result<Vec<String>, ChatError> {
        let eot = self.token("tokenizer.ggml.eot_token_id")?;
        let eom = self.token("tokenizer.ggml.eom_token_id")?;
        Ok(eot.into_iter().chain(eom).collect())
    }
}

/// The `tojson` filter transformers installs: Python's `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`, byte for byte.
mod python_json {
    use super::*;

    /// Nesting deeper than this is refused rather than recursed into.
    const MAX_DEPTH: usize = 256;

    struct Style {
        ensure_ascii: bool,
        indent: Option<String>,
        item_separator: String,
        key_separator: String,
        sort_keys: bool,
    }

    pub(super) fn tojson(
        state: &State,
        value: Value,
        ensure_ascii: Option<Value>,
        indent: Option<Value>,
        kwargs: Kwargs,
    ) -> Result<String, minijinja::Error> {
        let arg = |positional: Option<Value>, name: &str| -> Result<Option<Value>, minijinja::Error> {
            match positional {
                Some(v) => Ok(Some(v)),
                None => kwargs.get::<Option<Value>>(name),
            }
        };
        let ensure_ascii = arg(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
        let indent = match arg(indent, "indent")? {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) if v.kind() == ValueKind::String => v.as_str().map(str::to_owned),
            Some(v) => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    invalid(format!("tojson: indent must be an integer or a string, got {v}"))
                })?;
                Some(" ".repeat(n.clamp(0, 64) as usize))
            }
        };
        let (item_separator, key_separator) = match kwargs.get::<Option<Value>>("separators")? {
            Some(v) if !v.is_none() => {
                let parts: Vec<String> = v
                    .try_iter()?
                    .map(|p| p.as_str().map(str::to_owned))
                    .collect::<Option<_>>()
                    .filter(|p: &Vec<String>| p.len() == 2)
                    .ok_or_else(|| invalid("tojson: separators must be two strings".into()))?;
                (parts[0].clone(), parts[1].clone())
            }
            // Python's defaults: ", " without indent, "," with it.
            _ => (if indent.is_some() { "," } else { ", " }.to_owned(), ": ".to_owned()),
        };
        let sort_keys = kwargs.get::<Option<Value>>("sort_keys")?.is_some_and(|v| v.is_true());
        kwargs.assert_all_used()?;
        let style = Style { ensure_ascii, indent, item_separator, key_separator, sort_keys };
        let mut out = String::new();
        write_value(&mut out, &value, &style, 0)?;
        state.consume_fuel(out.len() as u64 / 64)?;
        Ok(out)
    }

    fn invalid(message: String) -> minijinja::Error {
        minijinja::Error::new(ErrorKind::InvalidOperation, message)
    }

    fn write_value(
        out: &mut String,
        value: &Value,
        style: &Style,
        depth: usize,
    ) -> Result<(), minijinja::Error> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!("tojson: nested deeper than {MAX_DEPTH} levels")));
        }
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => write_number(out, value)?,
            ValueKind::String => write_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
            ValueKind::Seq => {
                let items: Vec<Value> = value.try_iter()?.collect();
                write_container(out, '[', ']', items.len(), style, depth, |out, i| {
                    write_value(out, &items[i], style, depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((key_string(&key)?, item));
                }
                if style.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                write_container(out, '{', '}', entries.len(), style, depth, |out, i| {
                    write_string(out, &entries[i].0, style.ensure_ascii);
                    out.push_str(&style.key_separator);
                    write_value(out, &entries[i].1, style, depth + 1)
                })?;
            }
            kind => return Err(invalid(format!("tojson: a value of type {kind} is not JSON serializable"))),
        }
        Ok(())
    }

    /// `[a, b]` / `{"k": v}`, or one item per line with `indent`; empty ones stay `[]` / `{}`.
    fn write_container(
        out: &mut String,
        open: char,
        close: char,
        len: usize,
        style: &Style,
        depth: usize,
        mut item: impl FnMut(&mut String, usize) -> Result<(), minijinja::Error>,
    ) -> Result<(), minijinja::Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(indent) = &style.indent {
                out.push('\n');
                for _ in 0..level {
                    out.push_str(indent);
                }
            }
        };
        for i in 0..len {
            if i > 0 {
                out.push_str(&style.item_separator);
            }
            newline(out, depth + 1);
            item(out, i)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    /// Python turns non-string keys into strings: `1` → `"1"`, `True` → `"true"`, `None` → `"null"`.
    fn key_string(key: &Value) -> Result<String, minijinja::Error> {
        match key.kind() {
            ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
            ValueKind::None => Ok("null".into()),
            ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.into()),
            ValueKind::Number => {
                let mut s = String::new();
                write_number(&mut s, key)?;
                Ok(s)
            }
            kind => Err(invalid(format!("tojson: keys must be str, int, float, bool or None, not {kind}"))),
        }
    }

    fn write_number(out: &mut String, value: &Value) -> Result<(), minijinja::Error> {
        if value.is_integer() {
            let n = i128::try_from(value.clone())?;
            out.push_str(&n.to_string());
        } else {
            let x = f64::try_from(value.clone())?;
            out.push_str(&python_float_repr(x));
        }
        Ok(())
    }

    /// Python's `repr(float)` as `json.dumps` writes it: the shortest digits that read back,
    /// positional for exponents -4..16, else `d.ddde+XX`; NaN and infinities by name.
    pub(super) fn python_float_repr(x: f64) -> String {
        if x.is_nan() {
            return "NaN".into();
        }
        if x.is_infinite() {
            return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
        }
        let sign = if x.is_sign_negative() { "-" } else { "" };
        // Rust's `{:e}` gives the shortest round-trip digits: "1.2345e-7", "5e0".
        let sci = format!("{:e}", x.abs());
        let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
        let exponent: i32 = exponent.parse().unwrap_or(0);
        let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
        if (-4..16).contains(&exponent) {
            let point = exponent + 1; // digits before the decimal point
            if point <= 0 {
                format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
            } else {
                let point = point as usize;
                let (int, frac) = if digits.len() > point {
                    (digits[..point].to_owned(), digits[point..].to_owned())
                } else {
                    (format!("{digits}{}", "0".repeat(point - digits.len())), "0".to_owned())
                };
                format!("{sign}{int}.{frac}")
            }
        } else {
            let rest = &digits[1..];
            let mantissa =
                if rest.is_empty() { digits[..1].to_owned() } else { format!("{}.{rest}", &digits[..1]) };
            let exp_sign = if exponent < 0 { '-' } else { '+' };
            format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs())
        }
    }

    /// A JSON string as Python writes it: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, `\u00XX` for
    /// other control characters, and with `ensure_ascii` every non-ASCII character as `\uXXXX`
    /// (UTF-16 surrogate pairs above the BMP).
    fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
        use std::fmt::Write;
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::python_json::python_float_repr;
    use super::*;

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (0.1, "0.1"),
            (123456789.0, "123456789.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e17, "1.5e+17"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (-0.0, "-0.0"),
            (1e300, "1e+300"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "repr({x})");
        }
    }

    fn render_inline(source: &str) -> Result<String, ChatError> {
        let t =
            ChatTemplate::new(source, ChatSpecialTokens::default(), TemplateOrigin::Inline("test".into()))?;
        t.render(&[], false)
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        // The expected strings are json.dumps(...) of the same values in Python 3.11.
        let cases = [
            (
                r#"{{ {'a': 1, 'b': [true, none, 'x"y']} | tojson }}"#,
                r#"{"a": 1, "b": [true, null, "x\"y"]}"#,
            ),
            (r#"{{ 'héllo\n' | tojson }}"#, r#""héllo\n""#),
            (r#"{{ 'héllo🌍' | tojson(ensure_ascii=true) }}"#, r#""h\u00e9llo\ud83c\udf0d""#),
            (
                r#"{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2) }}"#,
                "{\n  \"b\": 1,\n  \"a\": [\n    1,\n    2\n  ]\n}",
            ),
            (r#"{{ {'b': 1, 'a': {}} | tojson(sort_keys=true) }}"#, r#"{"a": {}, "b": 1}"#),
            (r#"{{ [1, 2] | tojson(separators=(',', ':')) }}"#, "[1,2]"),
            (r#"{{ [1.5, 2.0, 1e20] | tojson }}"#, "[1.5, 2.0, 1e+20]"),
            (r#"{{ {1: 'a'} | tojson }}"#, r#"{"1": "a"}"#),
            (r#"{{ '\x01' | tojson }}"#, r#""\u0001""#),
        ];
        for (source, want) in cases {
            assert_eq!(render_inline(source).unwrap(), want, "{source}");
        }
        assert!(matches!(render_inline("{{ range(3) | tojson }}"), Err(ChatError::Render { .. })));
        assert!(matches!(render_inline("{{ x | tojson }}"), Err(ChatError::Render { .. })));
        assert!(matches!(render_inline("{{ 1 | tojson(bogus=1) }}"), Err(ChatError::Render { .. })));
    }

    #[test]
    fn strftime_now_formats_the_given_time() {
        let t = ChatTemplate::new(
            "{{ strftime_now('%d %b %Y') }}",
            ChatSpecialTokens::default(),
            TemplateOrigin::Inline("test".into()),
        )
        .unwrap();
        // 2024-07-26 12:00 UTC: the same calendar day in every time zone from UTC-11 to UTC+11.
        let noon = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_721_995_200);
        let options = RenderOptions { now: Some(noon), ..RenderOptions::default() };
        assert_eq!(t.render_with(&[], &options).unwrap(), "26 Jul 2024");
        let bad = ChatTemplate::new(
            "{{ strftime_now('%Q') }}",
            ChatSpecialTokens::default(),
            TemplateOrigin::Inline("test".into()),
        )
        .unwrap();
        assert!(matches!(bad.render(&[], false), Err(ChatError::Render { .. })));
    }
}
