//! Tokenizers built from hand-made GGUF vocabularies: a llama-style SentencePiece vocabulary
//! checked against a direct implementation of llama.cpp's SPM merge loop, and a small GPT-2
//! byte-level BPE vocabulary.

use bitnet_models::gguf::tokenizer::{pre_tokenizer_regexes, GgufTokenizer, VocabKind};
use bitnet_models::gguf::{write_gguf, GgufArray, GgufError, GgufFile, GgufMetadata, GgufValue};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const NORMAL: i32 = 1;
const BYTE: i32 = 6;

/// Pieces of the test vocabulary with distinct scores (higher merges first).
const PIECES: [&str; 40] = [
    "▁",
    "a",
    "b",
    "c",
    "d",
    "e",
    "h",
    "l",
    "o",
    "w",
    "r",
    "▁h",
    "he",
    "ll",
    "llo",
    "hell",
    "hello",
    "▁hello",
    "▁w",
    "or",
    "wor",
    "▁wor",
    "ld",
    "▁world",
    "ab",
    "abc",
    "bc",
    "cd",
    "▁a",
    "▁ab",
    "aa",
    "aaa",
    "▁▁",
    "▁▁▁▁",
    "lo",
    "el",
    "rl",
    "orl",
    "▁c",
    "▁d",
];

/// `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then the pieces.
fn spm_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![UNKNOWN, CONTROL, CONTROL];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(BYTE);
    }
    let mut scores = vec![0.0f32; tokens.len()];
    for (i, p) in PIECES.iter().enumerate() {
        tokens.push((*p).into());
        types.push(NORMAL);
        // distinct, not in id order, so the merge order is really by score
        scores.push(-(((i * 7) % PIECES.len()) as f32) - 1.0);
    }
    (tokens, scores, types)
}

fn spm_metadata(add_space_prefix: Option<bool>, add_bos: Option<bool>) -> GgufMetadata {
    let (tokens, scores, types) = spm_vocab();
    let mut md = GgufMetadata::new();
    md.insert("tokenizer.ggml.model", "llama".into());
    md.insert("tokenizer.ggml.tokens", GgufArray::String(tokens).into());
    md.insert("tokenizer.ggml.scores", GgufArray::F32(scores).into());
    md.insert("tokenizer.ggml.token_type", GgufArray::I32(types).into());
    md.insert("tokenizer.ggml.bos_token_id", GgufValue::U32(1));
    md.insert("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
    md.insert("tokenizer.ggml.unknown_token_id", GgufValue::U32(0));
    md.insert("tokenizer.chat_template", "{{ messages }}".into());
    if let Some(v) = add_space_prefix {
        md.insert("tokenizer.ggml.add_space_prefix", v.into());
    }
    if let Some(v) = add_bos {
        md.insert("tokenizer.ggml.add_bos_token", v.into());
    }
    md
}

/// llama.cpp's `llm_tokenizer_spm` written out plainly: start from characters, merge the
/// adjacent pair whose concatenation is the best-scoring token (leftmost on ties) until none
/// is left, then emit each symbol's id, or its bytes as `<0xNN>` tokens.
fn spm_reference(text: &str, add_space_prefix: bool, add_bos: bool) -> Vec<u32> {
    let (tokens, scores, types) = spm_vocab();
    let id: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == NORMAL)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut out = Vec::new();
    if add_bos {
        out.push(1);
    }
    if text.is_empty() {
        return out;
    }
    let mut norm = String::new();
    if add_space_prefix {
        norm.push(' ');
    }
    norm.push_str(text);
    let norm = norm.replace(' ', "▁");
    let mut sym: Vec<String> = norm.chars().map(String::from).collect();
    loop {
        let mut best: Option<(f32, usize)> = None;
        for i in 0..sym.len().saturating_sub(1) {
            let cat = format!("{}{}", sym[i], sym[i + 1]);
            if let Some(&t) = id.get(cat.as_str()) {
                if best.is_none_or(|(s, _)| scores[t] > s) {
                    best = Some((scores[t], i));
                }
            }
        }
        let Some((_, i)) = best else { break };
        let right = sym.remove(i + 1);
        sym[i].push_str(&right);
    }
    for s in &sym {
        match id.get(s.as_str()) {
            Some(&t) => out.push(t as u32),
            None => out.extend(s.bytes().map(|b| 3 + u32::from(b))),
        }
    }
    out
}

fn piece(p: &str) -> u32 {
    259 + PIECES.iter().position(|&x| x == p).unwrap() as u32
}

#[test]
fn sentencepiece_vocab_by_hand() {
    let tok = GgufTokenizer::from_metadata(&spm_metadata(None, None), "spm").unwrap();
    assert_eq!(tok.kind(), VocabKind::SentencePiece);
    assert!(tok.add_bos() && !tok.add_eos());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert_eq!(tok.chat_template(), Some("{{ messages }}"));

    // "▁world" does not come out whole: by score, ▁w (-7) merges first, then rl (-13), then
    // o+rl = orl (-20); "▁wor" (-17 via ▁w+or) never forms because "or" lost to "rl".
    assert_eq!(
        tok.encode("hello world", true).unwrap(),
        vec![1, piece("▁hello"), piece("▁w"), piece("orl"), piece("d")]
    );
    // "€" is not a piece: its three UTF-8 bytes become byte tokens
    assert_eq!(tok.encode("€", true).unwrap(), vec![1, piece("▁"), 3 + 0xE2, 3 + 0x82, 3 + 0xAC]);
    assert_eq!(tok.encode("", true).unwrap(), vec![1]);
    // special tokens in the text, and the space prefix after them
    assert_eq!(tok.encode("<s>hello</s>", false).unwrap(), vec![1, piece("▁hello"), 2]);
    assert_eq!(tok.decode(&tok.encode("hello world €", true).unwrap(), true).unwrap(), "hello world €");

    // the same vocabulary through a GGUF file on disk
    let dir = std::env::temp_dir().join(format!("bitnet-gguf-spm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("spm.gguf");
    write_gguf(&path, &spm_metadata(None, None), &[]).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let from_file = GgufTokenizer::from_gguf(&file).unwrap();
    assert_eq!(from_file.encode("hello world €", true).unwrap(), tok.encode("hello world €", true).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();

    // no space prefix, no BOS
    let tok = GgufTokenizer::from_metadata(&spm_metadata(Some(false), Some(false)), "spm").unwrap();
    assert_eq!(
        tok.encode("hello world", true).unwrap(),
        vec![piece("hello"), piece("▁w"), piece("orl"), piece("d")]
    );
}

#[test]
fn sentencepiece_matches_the_llama_cpp_algorithm() {
    let alphabet = ['a', 'b', 'c', 'd', 'e', 'h', 'l', 'o', 'w', 'r', ' ', ' ', '€', '中', '\n'];
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for (prefix, bos) in [(true, true), (false, false)] {
        let tok = GgufTokenizer::from_metadata(&spm_metadata(Some(prefix), Some(bos)), "spm").unwrap();
        let mut texts: Vec<String> = [
            "hello world",
            "  hello  world  ",
            "abcd abc ab a",
            "aaaaaaa",
            "hellohello",
            "worldworld",
            "    ",
            "helloworld",
            "orlorl",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for _ in 0..500 {
            let n = rng.random_range(0..24);
            texts.push((0..n).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect());
        }
        for t in &texts {
            assert_eq!(
                tok.encode(t, true).unwrap(),
                spm_reference(t, prefix, bos),
                "text {t:?} (space prefix {prefix})"
            );
        }
    }
}

/// GPT-2's byte-to-character map (printable bytes map to themselves, the rest to U+0100..).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap()
}

fn bpe_metadata(pre: &str) -> GgufMetadata {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    // ids 256.. in this order: Ġt, he, Ġthe, ca, Ġca, Ġcat, cat, 12; then <|end|> = 264
    let merges = ["Ġ t", "h e", "Ġt he", "c a", "Ġ ca", "Ġca t", "ca t", "1 2"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|end|>".into());
    let mut types = vec![NORMAL; tokens.len()];
    *types.last_mut().unwrap() = CONTROL;
    let mut md = GgufMetadata::new();
    md.insert("tokenizer.ggml.model", "gpt2".into());
    md.insert("tokenizer.ggml.pre", pre.into());
    md.insert("tokenizer.ggml.tokens", GgufArray::String(tokens).into());
    md.insert("tokenizer.ggml.token_type", GgufArray::I32(types).into());
    md.insert(
        "tokenizer.ggml.merges",
        GgufArray::String(merges.iter().map(|s| s.to_string()).collect()).into(),
    );
    md.insert("tokenizer.ggml.eos_token_id", GgufValue::U32(264));
    md
}

#[test]
fn byte_level_bpe_vocab_by_hand() {
    let tok = GgufTokenizer::from_metadata(&bpe_metadata("gpt-2"), "bpe").unwrap();
    assert_eq!(tok.kind(), VocabKind::Bpe);
    assert!(!tok.add_bos());
    assert_eq!(tok.eos_id(), Some(264));
    // " the cat" -> "Ġthe" (258), "Ġcat" (262); 'x' -> its byte token
    let the = 256 + 2;
    let cat = 256 + 5;
    assert_eq!(tok.encode(" the cat", true).unwrap(), vec![the, cat]);
    assert_eq!(tok.encode("x the<|end|>", true).unwrap(), vec![u32::from(b'x'), the, 264]);
    // the GPT-2 regex keeps digits together: "12" merges; smollm splits digits first
    assert_eq!(tok.encode("12", true).unwrap(), vec![256 + 7]);
    let smol = GgufTokenizer::from_metadata(&bpe_metadata("smollm"), "bpe").unwrap();
    assert_eq!(smol.encode("12", true).unwrap(), vec![u32::from(b'1'), u32::from(b'2')]);
    assert_eq!(tok.decode(&tok.encode("héllo\n wörld", true).unwrap(), false).unwrap(), "héllo\n wörld");

    // llama3-family names add BOS by default; add_bos_token overrides
    let mut md = bpe_metadata("llama-bpe");
    md.insert("tokenizer.ggml.bos_token_id", GgufValue::U32(264));
    let t = GgufTokenizer::from_metadata(&md, "bpe").unwrap();
    assert!(t.add_bos());
    assert_eq!(t.encode(" the", true).unwrap(), vec![264, the]);
    md.insert("tokenizer.ggml.add_bos_token", false.into());
    assert!(!GgufTokenizer::from_metadata(&md, "bpe").unwrap().add_bos());
}

#[test]
fn every_mapped_pre_tokenizer_builds() {
    for pre in [
        "default",
        "llama-bpe",
        "llama3",
        "dbrx",
        "smaug-bpe",
        "deepseek-coder",
        "falcon",
        "mpt",
        "starcoder",
        "gpt-2",
        "refact",
        "command-r",
        "qwen2",
        "stablelm2",
        "olmo",
        "poro-chat",
        "chatglm-bpe",
        "viking",
        "jais",
        "tekken",
        "smollm",
        "codeshell",
        "bloom",
        "gpt3-finnish",
        "exaone",
        "chameleon",
        "minerva-7b",
        "gpt-4o",
        "llama4",
        "trillion",
        "bailingmoe",
        "seed-coder",
        "grok-2",
        "glm4",
    ] {
        assert!(pre_tokenizer_regexes(pre).is_some(), "{pre}");
        let tok =
            GgufTokenizer::from_metadata(&bpe_metadata(pre), "bpe").unwrap_or_else(|e| panic!("{pre}: {e}"));
        let ids = tok.encode("Hello, wörld 123 the cat\n\n  x", false).unwrap();
        assert!(!ids.is_empty(), "{pre}");
    }
}

#[test]
fn bad_tokenizer_metadata_is_an_error() {
    let err = |md: &GgufMetadata| GgufTokenizer::from_metadata(md, "vocab.gguf").err().unwrap();

    let e = err(&bpe_metadata("no-such-pre")).to_string();
    assert!(e.contains("vocab.gguf") && e.contains("no-such-pre"), "{e}");

    let mut md = bpe_metadata("gpt-2");
    md.remove("tokenizer.ggml.merges");
    assert!(matches!(err(&md), GgufError::MissingKey { .. }));

    let mut md = bpe_metadata("gpt-2");
    md.insert("tokenizer.ggml.model", "bert".into());
    assert!(err(&md).to_string().contains("'bert'"));

    let mut md = spm_metadata(None, None);
    md.insert("tokenizer.ggml.scores", GgufArray::F32(vec![0.0; 3]).into());
    assert!(err(&md).to_string().contains("scores"));

    let mut md = spm_metadata(None, None);
    md.insert("tokenizer.ggml.token_type", GgufValue::U32(1));
    assert!(matches!(err(&md), GgufError::WrongType { .. }));

    let mut md = spm_metadata(None, None);
    md.remove("tokenizer.ggml.tokens");
    assert!(matches!(err(&md), GgufError::MissingKey { .. }));

    let mut md = spm_metadata(None, None);
    md.insert("tokenizer.ggml.add_bos_token", GgufValue::U8(1));
    assert!(matches!(err(&md), GgufError::WrongType { .. }));

    // an out-of-range BOS id is ignored, as llama.cpp does, so asking for BOS fails
    let mut md = spm_metadata(None, Some(true));
    md.insert("tokenizer.ggml.bos_token_id", GgufValue::U32(1_000_000));
    assert!(err(&md).to_string().contains("no BOS"));
}
