//! A model's conversation format: its chat template rendered to token ids, and what ends a
//! reply. Shared by `bitnet chat`, `generate --chat`, the server and the Python bindings.

use std::path::Path;

use bitnet_models::chat::{ChatMessage, ChatSpecialTokens, ChatTemplate, RenderOptions};
use bitnet_models::gguf::GgufFile;
use bitnet_models::tokenizer::Tokenizer;
use bitnet_models::ModelError;

use crate::load::LoadedModel;
use crate::InferenceError;

/// How a model reads a conversation and ends its turn.
#[derive(Clone, Debug)]
pub struct ChatFormat {
    pub template: ChatTemplate,
    /// Ids that end a reply: the end-of-turn tokens the template writes and the model's EOS ids.
    pub stop_ids: Vec<u32>,
    /// Texts that end a reply (the fallback template's next-turn header).
    pub stop_strings: Vec<String>,
    /// Prepended when the template does not write BOS but the model wants it (the fallback).
    bos_id: Option<u32>,
}

impl ChatFormat {
    /// The format of a loaded checkpoint: its template (tokenizer_config.json,
    /// chat_template.jinja or GGUF metadata), or the plain fallback
    /// ([`ChatFormat::is_fallback`]) when it has none.
    pub fn for_model<B: crate::Backend>(loaded: &LoadedModel<B>) -> Result<Self, InferenceError> {
        let source: &Path = &loaded.source;
        let template = if source.is_file() {
            let file = GgufFile::open(source).map_err(|e| ModelError::tensor(source, e.to_string()))?;
            ChatTemplate::from_gguf_or_fallback(&file)?
        } else if source.is_dir() {
            ChatTemplate::from_checkpoint_dir_or_fallback(source)?
        } else {
            // The embedded model: no tokenizer_config.json.
            ChatTemplate::fallback(ChatSpecialTokens::default())?
        };
        let tokenizer = loaded.tokenizer.as_ref();
        Ok(Self::new(
            template,
            tokenizer,
            &loaded.model.config.eos_token_ids,
            loaded.model.config.bos_token_id,
        ))
    }

    /// A format from a template and the model's ids.
    pub fn new(
        template: ChatTemplate,
        tokenizer: Option<&Tokenizer>,
        eos_ids: &[u32],
        bos_id: Option<u32>,
    ) -> Self {
        let mut stop_ids: Vec<u32> = eos_ids.to_vec();
        for token in template.end_of_turn_tokens() {
            if let Some(id) = tokenizer.and_then(|t| t.token_to_id(&token)) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        let stop_strings = template.stop_sequences();
        Self { template, stop_ids, stop_strings, bos_id }
    }

    pub fn is_fallback(&self) -> bool {
        self.template.is_fallback()
    }

    /// The conversation as the template renders it, ending with the header of the assistant's
    /// turn when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, InferenceError> {
        let opts = RenderOptions { add_generation_prompt, ..RenderOptions::default() };
        Ok(self.template.render_with(messages, &opts)?)
    }

    /// The conversation's token ids, as transformers' `apply_chat_template(tokenize=True)`
    /// makes them: the rendered text encoded without adding special tokens (the template writes
    /// its own), BOS first only for the fallback.
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, InferenceError> {
        Ok(self.render_and_encode(tokenizer, messages, add_generation_prompt)?.1)
    }

    /// [`ChatFormat::render`] and [`ChatFormat::encode`] at once: the text and its ids.
    pub fn render_and_encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<u32>), InferenceError> {
        let text = self.render(messages, add_generation_prompt)?;
        let mut ids = Vec::new();
        if self.template.needs_bos(&text) {
            ids.extend(self.bos_id);
        }
        ids.extend(tokenizer.encode_without_special_tokens(&text)?);
        Ok((text, ids))
    }
}
