//! Chat templates against transformers' `apply_chat_template`.
//!
//! tests/data/chat-templates/ holds real templates (BitNet b1.58 2B4T, Llama 3, Qwen3, SmolLM2,
//! Falcon 3; README.md there says where each came from) and fixtures.json, written by
//! tools/make_chat_template_fixtures.py: transformers' rendering of each on several
//! conversations, and the token ids of `apply_chat_template(tokenize=True)` with the default
//! model's tokenizer. Rendering must be byte-equal, the ids equal.
//!
//! The SmolLM2 GGUF test reads the real file through BITNET_SMOLLM2_GGUF
//! (`tools/fetch-test-models.sh`); without the variable it prints a SKIPPED line where `cargo test`
//! shows it and passes, except under `CI=true`, where it fails.

mod gguf_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitnet_models::chat::{
    messages_from_json, starts_with_bos, ChatError, ChatMessage, ChatSpecialTokens, ChatTemplate,
    RenderOptions, TemplateOrigin, FALLBACK_TEMPLATE,
};
use bitnet_models::gguf::{GgufArray, GgufFile, GgufMetadata, GgufValue};
use bitnet_models::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/chat-templates")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tokens_of(entry: &Value) -> ChatSpecialTokens {
    let token = |name: &str| entry["tokens"][name].as_str().map(str::to_owned);
    ChatSpecialTokens { bos: token("bos"), eos: token("eos"), unk: token("unk"), pad: token("pad") }
}

/// The templates of templates.json by name; "fallback" is the built-in one.
fn templates() -> BTreeMap<String, ChatTemplate> {
    let manifest = read_json(&data_dir().join("templates.json"));
    let mut out = BTreeMap::new();
    for entry in manifest["templates"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap().to_owned();
        let path = data_dir().join(entry["file"].as_str().unwrap());
        let source = std::fs::read_to_string(&path).unwrap();
        let template = if name == "fallback" {
            assert_eq!(source, FALLBACK_TEMPLATE, "the fixtures were made from another fallback");
            ChatTemplate::fallback(tokens_of(entry)).unwrap()
        } else {
            ChatTemplate::new(source, tokens_of(entry), TemplateOrigin::File(path)).unwrap()
        };
        out.insert(name, template);
    }
    out
}

struct Case {
    template: String,
    conversation: String,
    messages: Vec<ChatMessage>,
    options: RenderOptions,
    rendered: String,
    token_ids: Vec<u32>,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "{} / {} (add_generation_prompt={}, enable_thinking={:?})",
            self.template,
            self.conversation,
            self.options.add_generation_prompt,
            self.options.enable_thinking
        )
    }
}

fn cases() -> Vec<Case> {
    let fixtures = read_json(&data_dir().join("fixtures.json"));
    fixtures["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let conversation = c["conversation"].as_str().unwrap().to_owned();
            Case {
                template: c["template"].as_str().unwrap().to_owned(),
                messages: messages_from_json(&fixtures["conversations"][&conversation]).unwrap(),
                conversation,
                options: RenderOptions {
                    add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap(),
                    enable_thinking: c["enable_thinking"].as_bool(),
                    now: None,
                },
                rendered: c["rendered"].as_str().unwrap().to_owned(),
                token_ids: c["token_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_u64().unwrap() as u32)
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn renders_byte_equal_to_transformers() {
    let templates = templates();
    let cases = cases();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    for name in templates.keys() {
        assert!(cases.iter().any(|c| &c.template == name), "no fixture for {name}");
    }
    let mut failures = Vec::new();
    for case in &cases {
        let got = templates[&case.template].render_with(&case.messages, &case.options).unwrap();
        if got != case.rendered {
            failures.push(format!("{}:\n  want {:?}\n  got  {:?}", case.label(), case.rendered, got));
        }
    }
    assert!(failures.is_empty(), "{} of {} differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn enable_thinking_changes_qwen3s_generation_prompt() {
    let qwen3 = &templates()["qwen3"];
    let messages = [ChatMessage::user("Hi")];
    let render = |enable_thinking| {
        let options = RenderOptions { add_generation_prompt: true, enable_thinking, now: None };
        qwen3.render_with(&messages, &options).unwrap()
    };
    assert!(render(Some(false)).ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    assert!(render(None).ends_with("<|im_start|>assistant\n"));
    assert_eq!(render(None), render(Some(true)));
}

#[test]
fn token_ids_equal_transformers() {
    let tokenizer_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/default-model/tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path).unwrap();
    let bos = tokenizer.token_to_id("<|begin_of_text|>").unwrap();
    for case in cases() {
        let ids = tokenizer.encode_without_special_tokens(&case.rendered).unwrap();
        assert_eq!(ids, case.token_ids, "{}", case.label());
        // The ordinary encode adds this tokenizer's BOS: the reason the method above exists.
        let with_special = tokenizer.encode(&case.rendered).unwrap();
        assert_eq!(with_special[0], bos);
        assert_eq!(&with_special[1..], &ids[..], "{}", case.label());
    }
}

#[test]
fn bos_is_added_only_where_the_template_does_not_write_it() {
    let templates = templates();
    let messages = [ChatMessage::system("Be brief."), ChatMessage::user("Hi")];
    for (name, template) in &templates {
        let text = template.render(&messages, true).unwrap();
        if name == "fallback" {
            assert!(template.is_fallback());
            assert!(template.needs_bos(&text), "the fallback writes no BOS");
            assert!(!template.needs_bos(&format!("<|begin_of_text|>{text}")));
        } else {
            assert!(!template.is_fallback(), "{name}");
            assert!(!template.needs_bos(&text), "{name}: transformers adds no special tokens");
        }
    }
    // Llama 3's and BitNet's templates write BOS themselves; ChatML's do not.
    let bitnet = templates["bitnet-b1.58-2B-4T"].render(&messages, true).unwrap();
    assert!(starts_with_bos(&bitnet, Some("<|begin_of_text|>")));
    let llama = templates["llama-3-8b-instruct"].render(&messages, true).unwrap();
    assert!(starts_with_bos(&llama, Some("<|begin_of_text|>")));
    let qwen = templates["qwen3"].render(&messages, true).unwrap();
    assert!(!starts_with_bos(&qwen, Some("<|begin_of_text|>")));
    assert!(!starts_with_bos(&qwen, None));
    // A fallback that does not know its BOS string still asks for BOS (the caller has the id).
    let bare = ChatTemplate::fallback(ChatSpecialTokens::default()).unwrap();
    assert!(bare.needs_bos(&bare.render(&messages, true).unwrap()));
}

#[test]
fn end_of_turn_tokens_per_template() {
    let templates = templates();
    let want: [(&str, &[&str]); 6] = [
        ("bitnet-b1.58-2B-4T", &["<|eot_id|>"]),
        ("llama-3-8b-instruct", &["<|eot_id|>"]),
        ("qwen3", &["<|im_end|>"]),
        ("smollm2-instruct", &["<|im_end|>"]),
        ("falcon3-7b-instruct", &["<|endoftext|>"]),
        ("fallback", &["<|end_of_text|>"]),
    ];
    for (name, tokens) in want {
        assert_eq!(templates[name].end_of_turn_tokens(), tokens, "{name}");
    }
    // The EOS comes first; markers the template writes follow, each once.
    let llama_base = ChatTemplate::new(
        templates["llama-3-8b-instruct"].source(),
        ChatSpecialTokens { eos: Some("<|end_of_text|>".into()), ..Default::default() },
        TemplateOrigin::Inline("llama 3 with the base model's EOS".into()),
    )
    .unwrap();
    assert_eq!(llama_base.end_of_turn_tokens(), ["<|end_of_text|>", "<|eot_id|>"]);
    assert_eq!(templates["fallback"].stop_sequences(), ["\nUser:"]);
    assert!(templates["qwen3"].stop_sequences().is_empty());
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn fixture_text(template: &str, conversation: &str) -> (Vec<ChatMessage>, String) {
    let case = cases()
        .into_iter()
        .find(|c| c.template == template && c.conversation == conversation && c.options.add_generation_prompt)
        .unwrap();
    (case.messages, case.rendered)
}

#[test]
fn checkpoint_folder_string_template_and_token_objects() {
    let dir = tempfile::tempdir().unwrap();
    let source = templates()["llama-3-8b-instruct"].source().to_owned();
    let config = json!({
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": false, "normalized": false, "special": true},
        "eos_token": "<|eot_id|>",
        "chat_template": source,
    });
    write(dir.path(), "tokenizer_config.json", &config.to_string());
    let template = ChatTemplate::from_checkpoint_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.origin(), &TemplateOrigin::TokenizerConfig(dir.path().join("tokenizer_config.json")));
    assert_eq!(template.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(template.eos_token(), Some("<|eot_id|>"));
    let (messages, want) = fixture_text("llama-3-8b-instruct", "multi_turn");
    assert_eq!(template.render(&messages, true).unwrap(), want);

    // chat_template.jinja, which transformers saves beside the config, takes precedence.
    let qwen3 = templates()["qwen3"].source().to_owned();
    write(dir.path(), "chat_template.jinja", &qwen3);
    let template = ChatTemplate::from_checkpoint_dir(dir.path()).unwrap().unwrap();
    assert_eq!(template.origin(), &TemplateOrigin::File(dir.path().join("chat_template.jinja")));
    assert_eq!(template.source(), qwen3);
}

#[test]
fn checkpoint_folder_named_templates() {
    let dir = tempfile::tempdir().unwrap();
    let smollm2 = templates()["smollm2-instruct"].source().to_owned();
    let config = json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": [
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
            {"name": "default", "template": smollm2},
        ],
    });
    write(dir.path(), "tokenizer_config.json", &config.to_string());
    let template = ChatTemplate::from_checkpoint_dir(dir.path()).unwrap().unwrap();
    let (messages, want) = fixture_text("smollm2-instruct", "unicode");
    assert_eq!(template.render(&messages, true).unwrap(), want);

    let config =
        json!({"chat_template": [{"name": "rag", "template": "x"}, {"name": "tool_use", "template": "y"}]});
    write(dir.path(), "tokenizer_config.json", &config.to_string());
    let err = ChatTemplate::from_checkpoint_dir(dir.path()).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ChatError::Config { .. }), "{err:?}");
    assert!(message.contains("tokenizer_config.json") && message.contains("'default'"), "{message}");
    assert!(message.contains("rag, tool_use"), "{message}");
}

#[test]
fn checkpoint_folder_without_template_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ChatTemplate::from_checkpoint_dir(dir.path()).unwrap().is_none());
    write(dir.path(), "tokenizer_config.json", r#"{"bos_token": null, "model_max_length": 256}"#);
    write(dir.path(), "special_tokens_map.json", r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}}"#);
    assert!(ChatTemplate::from_checkpoint_dir(dir.path()).unwrap().is_none());
    let fallback = ChatTemplate::from_checkpoint_dir_or_fallback(dir.path()).unwrap();
    assert!(fallback.is_fallback());
    assert_eq!(fallback.origin(), &TemplateOrigin::Fallback);
    assert_eq!((fallback.bos_token(), fallback.eos_token()), (Some("<s>"), Some("</s>")));
    let messages =
        [ChatMessage::system("  Be brief. "), ChatMessage::user("Hi!"), ChatMessage::assistant("Hello.")];
    assert_eq!(
        fallback.render(&messages, false).unwrap(),
        "System: Be brief.\nUser: Hi!\nAssistant: Hello.\n"
    );
    let messages = [ChatMessage::user("Who are you?")];
    assert_eq!(fallback.render(&messages, true).unwrap(), "User: Who are you?\nAssistant:");
    assert_eq!(fallback.end_of_turn_tokens(), ["</s>"]);
}

#[test]
fn checkpoint_folder_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenizer_config.json");
    let check = |text: &str, needle: &str| {
        write(dir.path(), "tokenizer_config.json", text);
        let err = ChatTemplate::from_checkpoint_dir(dir.path()).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, ChatError::Config { .. }), "{err:?}");
        assert!(message.starts_with(&config.display().to_string()), "{message}");
        assert!(message.contains(needle), "{message}");
    };
    check("{not json", "not valid JSON");
    check(r#"{"chat_template": 5}"#, "chat_template must be a string or a list");
    check(r#"{"chat_template": [{"name": "default"}]}"#, "chat_template[0]");
    check(
        r#"{"chat_template": "x", "eos_token": {"id": 2}}"#,
        "eos_token is an object without a string 'content'",
    );
    check(r#"{"chat_template": "x", "bos_token": 1}"#, "bos_token must be a string");
    // A syntax error in the file's template names the file too.
    write(dir.path(), "tokenizer_config.json", r#"{"chat_template": "{% for m in messages %}"}"#);
    let err = ChatTemplate::from_checkpoint_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ChatError::Syntax { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer_config.json (chat_template)"), "{err}");
}

fn gguf_vocabulary() -> Vec<String> {
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello", "<|eot|>"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn gguf_metadata_template_and_token_strings() {
    let smollm2 = templates()["smollm2-instruct"].source().to_owned();
    let mut md = GgufMetadata::new();
    md.insert("tokenizer.ggml.tokens", GgufArray::String(gguf_vocabulary()).into());
    md.insert("tokenizer.ggml.bos_token_id", GgufValue::U32(1));
    md.insert("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
    md.insert("tokenizer.ggml.unknown_token_id", GgufValue::U32(0));
    md.insert("tokenizer.ggml.padding_token_id", GgufValue::I32(99)); // outside: names no token
    md.insert("tokenizer.ggml.eot_token_id", GgufValue::U32(4));

    // No template: none, or the fallback with the file's tokens.
    assert!(ChatTemplate::from_gguf_metadata(&md, "m.gguf").unwrap().is_none());
    let fallback = ChatTemplate::from_gguf_metadata_or_fallback(&md, "m.gguf").unwrap();
    assert!(fallback.is_fallback());
    assert_eq!(fallback.end_of_turn_tokens(), ["<|im_end|>", "<|eot|>"]);

    md.insert("tokenizer.chat_template", smollm2.as_str().into());
    let template = ChatTemplate::from_gguf_metadata(&md, "m.gguf").unwrap().unwrap();
    assert_eq!(template.origin(), &TemplateOrigin::Gguf("m.gguf".into()));
    let tokens = template.special_tokens();
    assert_eq!(tokens.bos.as_deref(), Some("<|im_start|>"));
    assert_eq!(tokens.eos.as_deref(), Some("<|im_end|>"));
    assert_eq!(tokens.unk.as_deref(), Some("<|endoftext|>"));
    assert_eq!(tokens.pad, None);
    assert_eq!(template.end_of_turn_tokens(), ["<|im_end|>", "<|eot|>"]);
    let (messages, want) = fixture_text("smollm2-instruct", "system_user");
    assert_eq!(template.render(&messages, true).unwrap(), want);

    md.insert("tokenizer.chat_template", GgufValue::U32(7));
    let err = ChatTemplate::from_gguf_metadata(&md, "m.gguf").unwrap_err();
    assert!(matches!(err, ChatError::Config { .. }), "{err:?}");
    assert!(err.to_string().starts_with("m.gguf: metadata key 'tokenizer.chat_template'"), "{err}");
    md.insert("tokenizer.chat_template", "{{ bos_token }}".into());
    md.insert("tokenizer.ggml.bos_token_id", GgufValue::String("one".into()));
    let err = ChatTemplate::from_gguf_metadata(&md, "m.gguf").unwrap_err();
    assert!(err.to_string().contains("'tokenizer.ggml.bos_token_id'"), "{err}");
}

#[test]
fn smollm2_gguf_template_renders_like_transformers() {
    let Some(path) = gguf_support::smollm2_gguf("smollm2_gguf_template_renders_like_transformers") else {
        return;
    };
    let file = GgufFile::open(&path).expect("BITNET_SMOLLM2_GGUF names a readable GGUF");
    let template = ChatTemplate::from_gguf(&file).unwrap().expect("SmolLM2 has a chat template");
    assert_eq!(template.source(), templates()["smollm2-instruct"].source());
    assert_eq!((template.bos_token(), template.eos_token()), (Some("<|im_start|>"), Some("<|im_end|>")));
    for case in cases().iter().filter(|c| c.template == "smollm2-instruct") {
        assert_eq!(
            template.render_with(&case.messages, &case.options).unwrap(),
            case.rendered,
            "{}",
            case.label()
        );
    }
}

fn inline(source: &str) -> Result<ChatTemplate, ChatError> {
    ChatTemplate::new(source, ChatSpecialTokens::default(), TemplateOrigin::Inline("my-template".into()))
}

#[test]
fn syntax_errors_are_typed_and_located() {
    let err = inline("Hello\n{% for m in messages %}{{ m.content }}").unwrap_err();
    match &err {
        ChatError::Syntax { origin, line, .. } => {
            assert_eq!(origin, "my-template");
            assert!(line.is_some(), "{err:?}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    assert!(err.to_string().starts_with("chat template from my-template: syntax error"), "{err}");
    for bad in ["{{ 'unterminated }}", "{% if %}{% endif %}", "{{ a b }}", "{% endfor %}", "{{ 'x' ~ }}"] {
        assert!(matches!(inline(bad), Err(ChatError::Syntax { .. })), "{bad}");
    }
}

#[test]
fn raise_exception_carries_the_templates_message() {
    // Gemma's and Mistral's templates refuse what they cannot format this way.
    let template = inline(
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
         {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
         {% endif %}{{ message['content'] }}{% endfor %}",
    )
    .unwrap();
    assert_eq!(template.render(&[ChatMessage::user("a")], true).unwrap(), "a");
    let err = template.render(&[ChatMessage::user("a"), ChatMessage::user("b")], true).unwrap_err();
    match &err {
        ChatError::Raised { origin, message } => {
            assert_eq!(origin, "my-template");
            assert_eq!(message, "Conversation roles must alternate user/assistant/user/assistant/...");
        }
        other => panic!("expected Raised, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "chat template from my-template refused the conversation: \
         Conversation roles must alternate user/assistant/user/assistant/..."
    );
    // Raised from inside a macro, too.
    let nested = inline(
        "{% macro check(m) %}{{ raise_exception('no ' ~ m.role) }}{% endmacro %}{{ check(messages[0]) }}",
    )
    .unwrap();
    let err = nested.render(&[ChatMessage::system("x")], false).unwrap_err();
    assert!(matches!(&err, ChatError::Raised { message, .. } if message == "no system"), "{err:?}");
}

#[test]
fn render_errors_are_typed() {
    let messages = [ChatMessage::user("hi")];
    let cases = [
        ("{{ frobnicate(messages) }}", "frobnicate"),
        ("{{ messages | frobnicate }}", "frobnicate"),
        ("{{ messages[0].content + 1 }}", "invalid operation"),
        ("{{ messages[0].content.frobnicate() }}", "frobnicate"),
        ("{{ nothing.here }}", "undefined"),
        ("{{ bos_token + 'x' }}", "undefined"), // a token the checkpoint does not have
    ];
    for (source, needle) in cases {
        let err = match inline(source) {
            Ok(template) => template.render(&messages, true).unwrap_err(),
            Err(err) => err,
        };
        assert!(matches!(err, ChatError::Render { .. } | ChatError::Syntax { .. }), "{source}: {err:?}");
        let message = err.to_string();
        assert!(message.starts_with("chat template from my-template: "), "{message}");
        assert!(message.to_lowercase().contains(needle), "{source}: {message}");
    }
}

#[test]
fn runaway_templates_run_out_of_fuel() {
    let messages = [ChatMessage::user("hi")];
    for source in [
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        "{{ 'x' * 99000000 }}",
        "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    ] {
        let started = Instant::now();
        let err = inline(source).unwrap().render(&messages, true).unwrap_err();
        assert!(matches!(err, ChatError::Render { .. }), "{source}: {err:?}");
        assert!(started.elapsed() < Duration::from_secs(20), "{source}: {:?}", started.elapsed());
    }
}

#[test]
fn long_conversations_fit_the_fuel_budget() {
    // 2000 messages of 2 KB each through every real template: far past a context window.
    let long = "word ".repeat(400);
    let messages: Vec<ChatMessage> = (0..2000)
        .map(|i| {
            if i % 2 == 0 {
                ChatMessage::user(format!("{i} {long}"))
            } else {
                ChatMessage::assistant(&long)
            }
        })
        .collect();
    for (name, template) in templates() {
        let text = template.render(&messages, true).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.len() > 2000 * long.len(), "{name}");
    }
}

#[test]
fn messages_from_json_rejects_what_is_not_role_and_content_strings() {
    let ok = messages_from_json(&json!([{"role": "user", "content": "hi", "name": "x"}])).unwrap();
    assert_eq!(ok, [ChatMessage::user("hi")]);
    let cases = [
        (json!({"role": "user"}), "messages must be an array, got an object"),
        (json!(["hi"]), "message 0: a message must be an object, got a string"),
        (json!([{"role": "user", "content": 5}]), "message 0: 'content' must be a string, got a number"),
        (
            json!([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]}]),
            "message 1: 'content' must be a string, got an array",
        ),
        (json!([{"role": "user", "content": null}]), "message 0: 'content' must be a string, got null"),
        (json!([{"content": "hi"}]), "message 0: 'role' is missing"),
    ];
    for (value, want) in cases {
        let err = messages_from_json(&value).unwrap_err();
        assert!(matches!(err, ChatError::BadMessage { .. }), "{err:?}");
        assert_eq!(err.to_string(), want);
    }
}
