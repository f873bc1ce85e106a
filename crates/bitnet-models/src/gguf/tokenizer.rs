//! A `tokenizers::Tokenizer` built from the vocabulary stored in GGUF metadata, made to give
//! the same ids as llama.cpp's tokenizer on the same file.
//!
//! Two vocabulary kinds (`tokenizer.ggml.model`):
//!
//! * `gpt2`, byte-level BPE: tokens (already in GPT-2's byte-to-char form), merges
//!   (`"a b"`, split at the first space after the first byte), and the pre-tokenizer named by
//!   `tokenizer.ggml.pre`. llama.cpp splits text with a list of regexes, each applied to the
//!   pieces of the previous one, keeping both matches and the text between them; that is a
//!   sequence of `Split(regex, Isolated)` here, followed by the byte-to-char mapping
//!   (`ByteLevel` without its own regex). [`pre_tokenizer_regexes`] has the table.
//! * `llama`, SentencePiece BPE: tokens with scores, byte tokens `<0xNN>` for bytes no piece
//!   covers, spaces written as `▁` and a `▁` put in front of the text (and after each special
//!   token) when `tokenizer.ggml.add_space_prefix` is true (the default). llama.cpp merges the
//!   adjacent pair whose concatenation is the highest-scoring piece, leftmost first; that is
//!   BPE with one merge per way of splitting a piece in two, ranked by the piece's score.
//!
//! Tokens of type CONTROL (3), USER_DEFINED (4) and UNKNOWN (2) are matched in the text
//! before anything else, as llama.cpp does when it parses special tokens. BOS/EOS are added
//! by a post-processor when `tokenizer.ggml.add_bos_token` / `add_eos_token` say so, with
//! llama.cpp's defaults when they are absent.

use super::error::GgufError;
use super::reader::GgufFile;
use super::value::{GgufArray, GgufMetadata, GgufValue};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

pub const KEY_MODEL: &str = "tokenizer.ggml.model";
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
pub const KEY_SCORES: &str = "tokenizer.ggml.scores";
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
pub const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
pub const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// llama.cpp's token types (`llama_token_type`).
pub mod token_type {
    pub const UNDEFINED: i32 = 0;
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The SentencePiece word-boundary mark that stands for a space.
const SPM_SPACE: &str = "\u{2581}";

/// llama.cpp's GPT-2 pre-tokenizer regex (its `\s+` tail is left out: text a regex does not
/// match stays a piece of its own anyway).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's regex, with `(?i:...)` spelled out as llama.cpp does.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes and treats a BPE vocabulary with `tokenizer.ggml.pre` = `pre`.
#[derive(Clone, Debug, PartialEq)]
pub struct PreTokenizerSpec {
    /// Applied in order, each to the pieces of the previous one.
    pub regexes: Vec<&'static str>,
    /// A whole word found in the vocabulary is one token, whatever the merges say.
    pub ignore_merges: bool,
    /// Whether BOS is added when `tokenizer.ggml.add_bos_token` is absent.
    pub add_bos_default: bool,
}

/// The regexes (from llama.cpp's `llm_tokenizer_bpe`) of the pre-tokenizer named `pre`, or
/// `None` for a name this table lacks (including those llama.cpp handles with custom code).
pub fn pre_tokenizer_regexes(pre: &str) -> Option<PreTokenizerSpec> {
    let spec = |regexes: Vec<&'static str>, ignore_merges: bool, add_bos_default: bool| {
        Some(PreTokenizerSpec { regexes, ignore_merges, add_bos_default })
    };
    match pre {
        "" | "default" => {
            spec(vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], false, false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
            spec(vec![LLAMA3], true, true)
        }
        "dbrx" | "smaug-bpe" | "chatglm-bpe" => spec(vec![LLAMA3], false, false),
        "glm4" => spec(vec![LLAMA3], true, false),
        "deepseek-coder" => {
            spec(vec!["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"], false, false)
        }
        "falcon" => spec(vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"], false, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            spec(vec![r"\p{N}", GPT2], false, false)
        }
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0"
        | "mellum" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "exaone4" | "mpt" | "olmo" | "jais"
        | "trillion" => spec(vec![GPT2], false, false),
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" | "hunyuan" | "grok-2" => {
            spec(vec![QWEN2], false, false)
        }
        "poro-chat" | "bloom" | "gpt3-finnish" => spec(vec![PORO], false, false),
        "viking" => spec(vec![PORO, r"\p{N}"], false, false),
        "tekken" => spec(vec![TEKKEN], true, true),
        "chameleon" => spec(
            vec![
                "<sentinel:[0-9]+>",
                "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                "([\\t\\n]|    |  )",
                r"\p{N}",
                r"[\p{P}!-/:-@\[-`{-~]",
                GPT2,
            ],
            false,
            true,
        ),
        "gpt-4o" | "llama4" => spec(vec![GPT4O], false, false),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => spec(vec![BAILINGMOE], false, false),
        "seed-coder" => spec(vec![SEED_CODER], false, false),
        _ => None,
    }
}

/// The vocabulary kind of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// `gpt2`: byte-level BPE with merges.
    Bpe,
    /// `llama`: SentencePiece BPE with scores and byte fallback.
    SentencePiece,
}

/// Ids of the special tokens named in the metadata (or llama.cpp's defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
}

/// A tokenizer built from GGUF metadata, with what the metadata says about using it.
#[derive(Clone)]
pub struct GgufTokenizer {
    tokenizer: Tokenizer,
    kind: VocabKind,
    pre: Option<String>,
    special: SpecialTokens,
    add_bos: bool,
    add_eos: bool,
    token_types: Vec<i32>,
    chat_template: Option<String>,
    file: String,
}

/// Reads the metadata of one file, with errors that name it.
struct Md<'a> {
    md: &'a GgufMetadata,
    file: &'a str,
}

impl Md<'_> {
    fn err(&self, reason: String) -> GgufError {
        GgufError::Tokenizer { file: self.file.to_owned(), reason }
    }

    fn wrong(&self, key: &str, expected: &'static str, found: &GgufValue) -> GgufError {
        let found = match found {
            GgufValue::Array(a) => format!("an array of {}", a.element_type()),
            v => format!("a {}", v.value_type()),
        };
        GgufError::WrongType { file: self.file.to_owned(), key: key.to_owned(), expected, found }
    }

    fn str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a bool", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::String(v))) => Ok(Some(v)),
            Some(v) => Err(self.wrong(key, "an array of strings", v)),
        }
    }

    /// A token id key; ids outside the vocabulary are ignored like llama.cpp does.
    fn id(&self, key: &str, n_tokens: usize) -> Result<Option<Option<u32>>, GgufError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => {
                let id = v.as_i64().ok_or_else(|| self.wrong(key, "an integer", v))?;
                Ok(Some(u32::try_from(id).ok().filter(|&i| (i as usize) < n_tokens)))
            }
        }
    }
}

/// Vocabulary entries, with llama.cpp's rename of empty tokens.
fn token_texts(tokens: &[String]) -> Vec<String> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| if t.is_empty() { format!("[EMPTY_{i}]") } else { t.clone() })
        .collect()
}

/// `text -> id`, the last id winning for repeated texts as in llama.cpp.
fn vocab_map(texts: &[String]) -> Vocab {
    texts.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
}

fn is_special_type(t: i32) -> bool {
    matches!(t, token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN)
}

impl GgufTokenizer {
    /// Builds the tokenizer of `file`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, GgufError> {
        Self::from_metadata(file.metadata(), file.file())
    }

    /// Builds the tokenizer described by `md`; `file` names it in errors.
    pub fn from_metadata(md: &GgufMetadata, file: &str) -> Result<Self, GgufError> {
        let m = Md { md, file };
        let model = m
            .str(KEY_MODEL)?
            .ok_or_else(|| GgufError::MissingKey { file: file.to_owned(), key: KEY_MODEL.into() })?;
        let kind = match model {
            "gpt2" => VocabKind::Bpe,
            "llama" => VocabKind::SentencePiece,
            other => {
                return Err(m.err(format!("vocabulary model '{other}' is not supported (gpt2 and llama are)")))
            }
        };
        let tokens = m
            .strings(KEY_TOKENS)?
            .ok_or_else(|| GgufError::MissingKey { file: file.to_owned(), key: KEY_TOKENS.into() })?;
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(m.err(format!("{} tokens in {KEY_TOKENS}", tokens.len())));
        }
        let n = tokens.len();
        let token_types: Vec<i32> = match md.get(KEY_TOKEN_TYPE) {
            None => vec![token_type::NORMAL; n],
            Some(GgufValue::Array(GgufArray::I32(v))) if v.len() >= n => v[..n].to_vec(),
            Some(GgufValue::Array(GgufArray::I32(v))) => {
                return Err(m.err(format!("{KEY_TOKEN_TYPE} has {} entries for {n} tokens", v.len())))
            }
            Some(v) => return Err(m.wrong(KEY_TOKEN_TYPE, "an array of i32", v)),
        };
        let texts = token_texts(tokens);
        let pre = m.str(KEY_PRE)?.map(str::to_owned);

        let add_bos_default;
        let mut tokenizer = match kind {
            VocabKind::Bpe => {
                let spec = pre_tokenizer_regexes(pre.as_deref().unwrap_or("")).ok_or_else(|| {
                    m.err(format!(
                        "pre-tokenizer '{}' is not in the table of gguf::tokenizer",
                        pre.as_deref().unwrap_or("")
                    ))
                })?;
                add_bos_default = spec.add_bos_default;
                build_bpe(&m, &texts, &spec)?
            }
            VocabKind::SentencePiece => {
                add_bos_default = true;
                let add_space_prefix = m.bool(KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
                build_spm(&m, &texts, &token_types, add_space_prefix)?
            }
        };

        // Special tokens are matched first, on the raw text.
        let added: Vec<AddedToken> = texts
            .iter()
            .zip(&token_types)
            .filter(|(_, &t)| is_special_type(t))
            .map(|(text, &t)| {
                if t == token_type::USER_DEFINED {
                    AddedToken::from(text.clone(), false).normalized(false)
                } else {
                    AddedToken::from(text.clone(), true)
                }
            })
            .collect();
        tokenizer.add_special_tokens(&added);

        let (def_bos, def_eos, def_unk) = match kind {
            VocabKind::SentencePiece => (Some(1), Some(2), Some(0)),
            VocabKind::Bpe => (Some(11), Some(11), None),
        };
        let in_vocab = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let id = |key: &str, default: Option<u32>| -> Result<Option<u32>, GgufError> {
            Ok(match m.id(key, n)? {
                Some(v) => v,
                None => in_vocab(default),
            })
        };
        let special = SpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id", def_bos)?,
            eos: id("tokenizer.ggml.eos_token_id", def_eos)?,
            eot: id("tokenizer.ggml.eot_token_id", None)?,
            eom: id("tokenizer.ggml.eom_token_id", None)?,
            unk: id("tokenizer.ggml.unknown_token_id", def_unk)?,
            sep: id("tokenizer.ggml.seperator_token_id", None)?,
            pad: id("tokenizer.ggml.padding_token_id", None)?,
        };
        let add_bos = m.bool(KEY_ADD_BOS)?.unwrap_or(add_bos_default);
        let add_eos = m.bool(KEY_ADD_EOS)?.unwrap_or(false);
        if add_bos && special.bos.is_none() {
            return Err(m.err(format!("{KEY_ADD_BOS} is set but there is no BOS token")));
        }
        if add_eos && special.eos.is_none() {
            return Err(m.err(format!("{KEY_ADD_EOS} is set but there is no EOS token")));
        }
        let post = bos_eos_processor(&texts, &special, add_bos, add_eos)
            .map_err(|e| m.err(format!("BOS/EOS template: {e}")))?;
        tokenizer.with_post_processor(post);

        let chat_template = m.str(KEY_CHAT_TEMPLATE)?.map(str::to_owned);
        Ok(GgufTokenizer {
            tokenizer,
            kind,
            pre,
            special,
            add_bos,
            add_eos,
            token_types,
            chat_template,
            file: file.to_owned(),
        })
    }

    /// The `tokenizers` tokenizer, for callers that want its full API.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn into_tokenizer(self) -> Tokenizer {
        self.tokenizer
    }
    pub fn kind(&self) -> VocabKind {
        self.kind
    }
    /// `tokenizer.ggml.pre`, for BPE vocabularies.
    pub fn pre(&self) -> Option<&str> {
        self.pre.as_deref()
    }
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }
    /// Whether [`GgufTokenizer::encode`] with `add_special` puts BOS first.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
    /// `tokenizer.ggml.token_type` (NORMAL for every token when absent).
    pub fn token_types(&self) -> &[i32] {
        &self.token_types
    }
    pub fn vocab_size(&self) -> usize {
        self.token_types.len()
    }
    /// `tokenizer.chat_template`, the Jinja template of chat prompts.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`; with `add_special`, BOS/EOS as the metadata asks (like
    /// `llama_tokenize(..., add_special = true, parse_special = true)`).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, GgufError> {
        self.tokenizer.encode(text, add_special).map(|e| e.get_ids().to_vec()).map_err(|e| {
            GgufError::Tokenizer { file: self.file.clone(), reason: format!("encoding failed: {e}") }
        })
    }

    /// The text of `ids`; with `skip_special`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, GgufError> {
        self.tokenizer.decode(ids, skip_special).map_err(|e| GgufError::Tokenizer {
            file: self.file.clone(),
            reason: format!("decoding failed: {e}"),
        })
    }
}

/// Byte-level BPE: vocabulary, merges and the regex pre-tokenizer of `spec`.
fn build_bpe(m: &Md<'_>, texts: &[String], spec: &PreTokenizerSpec) -> Result<Tokenizer, GgufError> {
    let vocab = vocab_map(texts);
    let raw_merges = m
        .strings(KEY_MERGES)?
        .ok_or_else(|| GgufError::MissingKey { file: m.file.to_owned(), key: KEY_MERGES.into() })?;
    // A merge splits at the first space after its first byte (so "  a" merges " " and "a"
    // in llama.cpp's reading). Merges with a side or a result outside the vocabulary can
    // never produce a token; the tokenizers crate refuses them, so they are dropped.
    let mut merges: Merges = Vec::with_capacity(raw_merges.len());
    for mg in raw_merges {
        let split = mg.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
        let Some(i) = split else { continue };
        let (a, b) = (&mg[..i], &mg[i + 1..]);
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}")) {
            merges.push((a.to_owned(), b.to_owned()));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| m.err(format!("BPE model: {e}")))?;
    let mut pre: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
    for re in &spec.regexes {
        let split =
            Split::new(SplitPattern::Regex((*re).to_owned()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| m.err(format!("pre-tokenizer regex {re:?}: {e}")))?;
        pre.push(split.into());
    }
    pre.push(ByteLevel::new(false, false, false).into());
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(pre)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// SentencePiece BPE: merges derived from the piece scores, byte fallback, `▁` for spaces.
fn build_spm(
    m: &Md<'_>,
    texts: &[String],
    types: &[i32],
    add_space_prefix: bool,
) -> Result<Tokenizer, GgufError> {
    let scores: Vec<f32> = match m.md.get(KEY_SCORES) {
        None => vec![0.0; texts.len()],
        Some(GgufValue::Array(GgufArray::F32(v))) if v.len() >= texts.len() => v.clone(),
        Some(GgufValue::Array(GgufArray::I32(v))) if v.len() >= texts.len() => {
            v.iter().map(|&x| x as f32).collect()
        }
        Some(GgufValue::Array(a)) => {
            return Err(m.err(format!(
                "{KEY_SCORES} has {} entries of {} for {} tokens",
                a.len(),
                a.element_type(),
                texts.len()
            )))
        }
        Some(v) => return Err(m.wrong(KEY_SCORES, "an array of f32", v)),
    };
    let vocab = vocab_map(texts);
    // Pieces that the merge loop can produce: what llama.cpp finds by text, less the special
    // and byte tokens, which are matched or emitted by other means.
    let piece: HashMap<&str, usize> = texts
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(types[*i], token_type::CONTROL | token_type::UNKNOWN | token_type::BYTE))
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // One merge per split of a piece into two pieces, best score first (ties: lower id),
    // which replays llama.cpp's "merge the best-scoring adjacent pair" as BPE ranks.
    let mut ranked: Vec<(f32, usize, String, String)> = Vec::new();
    for (&text, &id) in &piece {
        if piece.get(text) != Some(&id) {
            continue;
        }
        for (k, _) in text.char_indices().skip(1) {
            let (a, b) = text.split_at(k);
            if piece.contains_key(a) && piece.contains_key(b) {
                ranked.push((scores[id], id, a.to_owned(), b.to_owned()));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.len().cmp(&y.2.len())));
    let merges: Merges = ranked.into_iter().map(|(_, _, a, b)| (a, b)).collect();

    let unk = texts.iter().zip(types).find(|(_, &t)| t == token_type::UNKNOWN).map(|(t, _)| t.clone());
    let has_bytes = (0..=255u8).all(|b| vocab.contains_key(&format!("<0x{b:02X}>")));
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(has_bytes).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| m.err(format!("SentencePiece model: {e}")))?;

    let replace = Replace::new(" ", SPM_SPACE).map_err(|e| m.err(format!("normalizer: {e}")))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new(SPM_SPACE.to_owned()).into(), replace.into()]).into()
    } else {
        replace.into()
    };
    let mut decoders: Vec<DecoderWrapper> = vec![
        tokenizers::decoders::DecoderWrapper::Replace(
            Replace::new(SPM_SPACE, " ").map_err(|e| m.err(format!("decoder: {e}")))?,
        ),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(normalizer));
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// A post-processor adding BOS and/or EOS around a single sequence, or none.
fn bos_eos_processor(
    texts: &[String],
    special: &SpecialTokens,
    add_bos: bool,
    add_eos: bool,
) -> Result<Option<TemplateProcessing>, String> {
    if !add_bos && !add_eos {
        return Ok(None);
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut tokens = Vec::new();
    let mut push = |id: u32, single: &mut Vec<String>| {
        let text = texts[id as usize].clone();
        single.push(text.clone());
        tokens.push((text, id));
    };
    if let (true, Some(b)) = (add_bos, special.bos) {
        push(b, &mut single);
    }
    single.push("$A".into());
    if let (true, Some(e)) = (add_eos, special.eos) {
        push(e, &mut single);
    }
    for part in &single {
        pair.push(part.clone());
    }
    for part in &single {
        pair.push(if part == "$A" { "$B".into() } else { part.clone() });
    }
    // Pieces are given as a list, so token texts with spaces stay whole.
    TemplateProcessing::builder()
        .try_single(single)?
        .try_pair(pair)?
        .special_tokens(tokens)
        .build()
        .map(Some)
        .map_err(|e| e.to_string())
}
