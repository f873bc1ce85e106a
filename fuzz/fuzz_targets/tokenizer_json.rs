//! Any bytes as tokenizer.json give a tokenizer or a typed error, never a panic; a tokenizer
//! that loads encodes and decodes any text (or says why not) and streams its ids back to text.
//!
//! Input layout: tokenizer.json, a 0x00 byte, the text to encode. Without a 0x00 byte the
//! whole input is tokenizer.json and the text is fixed.
#![no_main]

use std::path::Path;

use bitnet_models::tokenizer::{TextStreamer, Tokenizer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (json, text) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], String::from_utf8_lossy(&data[i + 1..]).into_owned()),
        None => (data, "Hello, world! <s> 123 é 漢字 \u{1F600}".to_owned()),
    };
    let Ok(tok) = Tokenizer::from_bytes(json, Path::new("fuzz/tokenizer.json")) else {
        return;
    };
    let _ = tok.vocab_size();
    let _ = tok.token_to_id("<s>");
    let mut all_ids = Vec::new();
    if let Ok(ids) = tok.encode(&text) {
        all_ids.extend(ids);
    }
    if let Ok(ids) = tok.encode_without_special_tokens(&text) {
        all_ids.extend(ids);
    }
    // Ids past the vocabulary too: a model's vocab_size may exceed its tokenizer's.
    all_ids.extend([0, 1, 2, 255, 256, u32::MAX]);
    let _ = tok.decode(&all_ids);
    let mut streamer = TextStreamer::new();
    for &id in all_ids.iter().take(64) {
        if streamer.push(&tok, id).is_err() {
            return;
        }
    }
    let _ = streamer.finish(&tok);
});
