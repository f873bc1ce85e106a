//! tokenizer.json inputs from `fuzz/fuzz_targets/tokenizer_json.rs`: each panicked before its
//! fix; now a typed error naming the file.

use std::path::Path;

use bitnet_models::tokenizer::Tokenizer;

/// A small valid byte-level BPE tokenizer.json whose `decoder` object is `decoder`.
fn with_decoder(decoder: &[u8]) -> Vec<u8> {
    let mut json = br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
        "post_processor":null,"decoder":"#
        .to_vec();
    json.extend_from_slice(decoder);
    json.extend_from_slice(
        br#","model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
        "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,
        "vocab":{"h":0,"i":1,"hi":2},"merges":["h i"]}}"#,
    );
    json
}

fn load(bytes: &[u8]) -> Result<Tokenizer, String> {
    Tokenizer::from_bytes(bytes, Path::new("m/tokenizer.json")).map_err(|e| e.to_string())
}

/// The error of loading `bytes`, which must fail.
fn error_of(bytes: &[u8]) -> String {
    match load(bytes) {
        Ok(_) => panic!("a malformed tokenizer.json must be refused"),
        Err(e) => e,
    }
}

#[test]
fn the_base_tokenizer_loads_and_encodes() {
    let tok = load(&with_decoder(
        br#"{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true}"#,
    ))
    .unwrap();
    assert_eq!(tok.encode("hi").unwrap(), vec![2]);
    assert_eq!(tok.decode(&[2]).unwrap(), "hi");
}

/// The fuzzer's input (`fuzz/seeds/tokenizer_json/regression-decoder-invalid-utf8.bin`): bytes
/// that are not UTF-8 inside the decoder's `type` made `tokenizers` panic ("Helper").
#[test]
fn malformed_json_inside_the_decoder_is_an_error_not_a_panic() {
    let cases: [&[u8]; 4] = [
        b"{\"type\":\"By\x85\x9a\xb3\x9avel\",\"add_prefix_space\":true,\"trim_offsets\":true,\"use_regex\":true}",
        br#"{"type":"ByteLevel","add_prefix_space":tru}"#,
        br#"{"type":"Replace","pattern":{"String":"\ud800"},"content":" "}"#,
        &[b'['; 200],
    ];
    for decoder in cases {
        let err = error_of(&with_decoder(decoder));
        assert!(err.contains("m/tokenizer.json") && err.contains("not a valid tokenizer.json"), "{err}");
    }
    let seed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds/tokenizer_json/regression-decoder-invalid-utf8.bin");
    let bytes = std::fs::read(seed).unwrap();
    let json = &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())];
    assert!(error_of(json).contains("not a valid tokenizer.json"));
}

/// A `TemplateProcessing` post-processor, (as JSON) with `single` as its one-text template and
/// `special` as its special tokens, on the base tokenizer.
fn with_post_processor(post: &str) -> Vec<u8> {
    let decoder = br#"{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true}"#;
    let json = String::from_utf8(with_decoder(decoder)).unwrap();
    json.replacen(r#""post_processor":null"#, &format!(r#""post_processor":{post}"#), 1).into_bytes()
}

fn template(single: &str, special: &str) -> String {
    format!(
        r#"{{"type":"TemplateProcessing","single":{single},
        "pair":[{{"Sequence":{{"id":"A","type_id":0}}}},{{"Sequence":{{"id":"B","type_id":1}}}}],
        "special_tokens":{special}}}"#
    )
}

/// `tokenizers` builds a TemplateProcessing from JSON without its builder's checks, then panics
/// while encoding: on a special token the template names but does not define (the fuzzer's
/// `regression-template-undefined-special-token.bin`, whose map key differs from the token's
/// `id`), and on a one-text template that uses the second sequence. Both are load errors now.
#[test]
fn a_template_post_processor_that_would_panic_is_refused_at_load() {
    let cls = r#"{"SpecialToken":{"id":"<s>","type_id":0}}"#;
    let a = r#"{"Sequence":{"id":"A","type_id":0}}"#;
    let cases = [
        (template(&format!("[{cls},{a}]"), "{}"), "undefined special token `<s>`"),
        (
            template(&format!("[{cls},{a}]"), r#"{"ll>":{"id":"<s>","ids":[1],"tokens":["<s>"]}}"#),
            "undefined special token `<s>`",
        ),
        (template(r#"[{"Sequence":{"id":"B","type_id":0}}]"#, "{}"), "second sequence"),
        (
            template(&format!("[{cls},{a}]"), r#"{"<s>":{"id":"<s>","ids":[1,2],"tokens":["<s>"]}}"#),
            "different number of ids and tokens",
        ),
        (
            format!(
                r#"{{"type":"Sequence","processors":[{{"type":"ByteLevel","add_prefix_space":true,
                "trim_offsets":false,"use_regex":true}},{}]}}"#,
                template(&format!("[{cls},{a}]"), "{}")
            ),
            "undefined special token",
        ),
    ];
    for (post, why) in cases {
        let err = error_of(&with_post_processor(&post));
        assert!(
            err.contains("m/tokenizer.json") && err.contains("post_processor") && err.contains(why),
            "{err}"
        );
    }
    // The same template with its token defined loads and adds it.
    let good = template(&format!("[{cls},{a}]"), r#"{"<s>":{"id":"<s>","ids":[1],"tokens":["<s>"]}}"#);
    let tok = load(&with_post_processor(&good)).unwrap();
    assert_eq!(tok.encode("hi").unwrap(), vec![1, 2]);

    let seed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds/tokenizer_json/regression-template-undefined-special-token.bin");
    let bytes = std::fs::read(seed).unwrap();
    let json = &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())];
    assert!(error_of(json).contains("undefined special token `<s>`"));
}
