//! `tokenizer.json` through the `tokenizers` crate, and a streaming detokenizer that never
//! prints half a UTF-8 character.

use std::path::{Path, PathBuf};

use crate::ModelError;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses tokenizer.json bytes; `source` names them in errors.
    pub fn from_bytes(bytes: &[u8], source: &Path) -> Result<Self, ModelError> {
        Ok(Self { inner: parse_tokenizer_json(bytes, source)?, source: source.to_path_buf() })
    }

    /// Wraps an already-built tokenizer (for example one made from GGUF metadata).
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, source: &Path) -> Self {
        Self { inner, source: source.to_path_buf() }
    }

    /// Token ids of `text`, with the special tokens (BOS) the tokenizer's template adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::tokenizer(&self.source, format!("cannot encode the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` as it stands: no BOS/EOS added, special tokens written in the text
    /// still matched (transformers' `encode(text, add_special_tokens=False)`, which is how
    /// `apply_chat_template(tokenize=True)` encodes a rendered chat prompt).
    pub fn encode_without_special_tokens(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::tokenizer(&self.source, format!("cannot encode the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, with special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::tokenizer(&self.source, format!("cannot decode tokens: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// tokenizer.json bytes as a `tokenizers` tokenizer; `source` names them in errors.
///
/// The text is parsed as JSON first and the tokenizer built from that value: the `tokenizers`
/// crate deserializes its `decoder` with an `.expect`, so malformed JSON there (invalid UTF-8 in
/// a string, found by `fuzz/fuzz_targets/tokenizer_json.rs`) panicked inside it; from an already
/// valid value that step cannot fail.
///
/// The post-processor is checked here too (`check_post_processor`): `tokenizers` builds a
/// `TemplateProcessing` from JSON without the checks its builder makes, and then panics while
/// encoding.
pub fn parse_tokenizer_json(bytes: &[u8], source: &Path) -> Result<tokenizers::Tokenizer, ModelError> {
    let bad =
        |e: serde_json::Error| ModelError::tokenizer(source, format!("not a valid tokenizer.json: {e}"));
    let json: serde_json::Value = serde_json::from_slice(bytes).map_err(bad)?;
    if let Some(post) = json.get("post_processor") {
        check_post_processor(post).map_err(|why| {
            ModelError::tokenizer(source, format!("not a valid tokenizer.json: post_processor {why}"))
        })?;
    }
    serde_json::from_value(json).map_err(bad)
}

/// What `TemplateProcessing`'s builder requires and its JSON form skips, in a post-processor
/// (or a `Sequence` of them): every special token a template names is defined, with as many ids
/// as tokens, and the `single` template uses only the first sequence (`$A`), since encoding
/// one text indexes the second sequence out of bounds. Shapes other than these are left to
/// `tokenizers`, which refuses them with an error.
fn check_post_processor(post: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    match post.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for inner in post.get("processors").and_then(Value::as_array).into_iter().flatten() {
                check_post_processor(inner)?;
            }
            Ok(())
        }
        Some("TemplateProcessing") => {
            let defined = post.get("special_tokens").and_then(Value::as_object);
            for (name, token) in defined.into_iter().flatten() {
                let len = |key: &str| token.get(key).and_then(Value::as_array).map(Vec::len);
                if len("ids") != len("tokens") {
                    return Err(format!("special token `{name}` has a different number of ids and tokens"));
                }
            }
            for template in ["single", "pair"] {
                for piece in post.get(template).and_then(Value::as_array).into_iter().flatten() {
                    if let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) {
                        if !defined.is_some_and(|d| d.contains_key(id)) {
                            return Err(format!(
                                "template `{template}` names the undefined special token `{id}`"
                            ));
                        }
                    }
                    let sequence = piece.pointer("/Sequence/id").and_then(Value::as_str);
                    if template == "single" && sequence == Some("B") {
                        return Err("template `single` uses the second sequence `B`".to_owned());
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Turns a growing list of token ids into text pieces as soon as they are whole characters.
///
/// Decoding one token at a time breaks multi-byte characters split across byte-level tokens
/// and loses the spaces SentencePiece attaches to the next token. So the streamer decodes a
/// window starting a few tokens back and emits only what the new token added, holding back
/// while the text ends in U+FFFD (an incomplete character).
#[derive(Default)]
pub struct TextStreamer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStreamer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, ModelError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// Whatever is still held back (an incomplete character at the end of generation).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>, ModelError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.strip_prefix(prefix.as_str()).filter(|s| !s.is_empty()).map(str::to_string))
    }
}
