//! Any template source and any conversation give a rendered prompt or a typed error, never a
//! panic, a hang or a huge allocation (the render's fuel bounds both).
//!
//! Input layout: the template source, a 0x00 byte, a flags byte, then the messages separated by
//! 0x01 bytes, their roles cycling system/user/assistant/tool. Without a 0x00 byte the whole
//! input is the template and the conversation is fixed.
#![no_main]

use bitnet_models::chat::{ChatMessage, ChatSpecialTokens, ChatTemplate, RenderOptions, TemplateOrigin};
use libfuzzer_sys::fuzz_target;

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fn conversation(rest: &[u8]) -> Vec<ChatMessage> {
    rest.split(|&b| b == 0x01)
        .enumerate()
        .map(|(i, content)| ChatMessage::new(ROLES[i % ROLES.len()], String::from_utf8_lossy(content)))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (source, flags, messages) = match data.iter().position(|&b| b == 0) {
        Some(i) => {
            let flags = data.get(i + 1).copied().unwrap_or(0);
            (&data[..i], flags, conversation(data.get(i + 2..).unwrap_or_default()))
        }
        None => (data, 0b11, vec![ChatMessage::system("Be brief."), ChatMessage::user("Hi <|im_end|> {{ x }}")]),
    };
    let source = String::from_utf8_lossy(source);
    let tokens = ChatSpecialTokens {
        bos: (flags & 0b100 != 0).then(|| "<s>".to_owned()),
        eos: Some("</s>".to_owned()),
        unk: None,
        pad: None,
    };
    let Ok(template) = ChatTemplate::new(source.as_ref(), tokens, TemplateOrigin::Inline("fuzz".into())) else {
        return;
    };
    let options = RenderOptions {
        add_generation_prompt: flags & 0b1 != 0,
        enable_thinking: (flags & 0b10 != 0).then_some(flags & 0b1000 != 0),
        now: None,
    };
    if let Ok(text) = template.render_with(&messages, &options) {
        let _ = template.needs_bos(&text);
    }
    let _ = template.end_of_turn_tokens();
});
