//! Every endpoint and error of the router, driven in memory with `tower::ServiceExt::oneshot`
//! over the mock engine.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use bitnet_server::mock::{MockConfig, MockEngine, PANGRAM};
use bitnet_server::{router, Engine, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

mod support;
use support::http_client::sse_data;

fn mock(cfg: MockConfig) -> Arc<MockEngine> {
    Arc::new(MockEngine::new(cfg))
}

fn fast_mock() -> Arc<MockEngine> {
    mock(MockConfig { token_delay: Duration::from_micros(100), ..Default::default() })
}

fn app_with(engine: Arc<MockEngine>, cfg: ServerConfig) -> Router {
    router(engine, cfg)
}

fn app(engine: Arc<MockEngine>) -> Router {
    app_with(engine, ServerConfig::default())
}

struct Reply {
    status: StatusCode,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The SSE payloads: every one JSON but the final `[DONE]`.
    fn events(&self) -> Vec<Value> {
        assert!(self.content_type.starts_with("text/event-stream"), "{}", self.content_type);
        let data = sse_data(&self.body);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{}", self.body);
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
    }

    /// Checks the OpenAI error shape and returns the error object.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert!(self.content_type.starts_with("application/json"), "{}", self.content_type);
        let err = self.json()["error"].clone();
        for key in ["message", "type", "param", "code"] {
            assert!(err.get(key).is_some(), "missing {key}: {}", self.body);
        }
        assert!(!err["message"].as_str().unwrap().is_empty());
        err
    }
}

async fn send(app: &Router, req: Request<Body>) -> Reply {
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    Reply { status, content_type, body: String::from_utf8(body.to_vec()).unwrap() }
}

async fn get(app: &Router, path: &str) -> Reply {
    send(app, Request::get(path).body(Body::empty()).unwrap()).await
}

async fn post(app: &Router, path: &str, body: impl Into<Body>) -> Reply {
    let req = Request::post(path).header(header::CONTENT_TYPE, "application/json").body(body.into()).unwrap();
    send(app, req).await
}

async fn post_json(app: &Router, path: &str, body: Value) -> Reply {
    post(app, path, body.to_string()).await
}

/// The mock's reply to a completions prompt, cut to `n` words.
fn reply_words(prompt: &str, n: usize) -> String {
    let reply = format!("You said: {prompt}. {PANGRAM}");
    reply.split(' ').take(n).collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn models_lists_the_engines_model() {
    let app = app(fast_mock());
    let r = get(&app, "/v1/models").await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "mock-bitnet");
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["max_model_len"], 512);
    assert_eq!(get(&app, "/v1/models/mock-bitnet").await.json()["id"], "mock-bitnet");
    get(&app, "/v1/models/gpt-4").await.error(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn completion_stops_at_max_tokens() {
    let app = app(fast_mock());
    let r = post_json(&app, "/v1/completions", json!({"model": "x", "prompt": "Once upon", "max_tokens": 3}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let body = r.json();
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], "mock-bitnet");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["text"], reply_words("Once upon", 3));
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["logprobs"], Value::Null);
    // BOS + 9 bytes.
    assert_eq!(body["usage"], json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}));
}

#[tokio::test]
async fn completion_runs_to_eos_and_honours_stop_strings() {
    let app = app(fast_mock());
    let r = post_json(&app, "/v1/completions", json!({"prompt": "Hi"})).await.json();
    let full = format!("You said: Hi. {PANGRAM}");
    assert_eq!(r["choices"][0]["text"], full);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    // Every word, then EOS.
    assert_eq!(r["usage"]["completion_tokens"], full.split(' ').count() + 1);

    let r = post_json(&app, "/v1/completions", json!({"prompt": "Hi", "stop": ["fox", "zzz"]})).await.json();
    assert_eq!(r["choices"][0]["text"], "You said: Hi. The quick brown ");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let r = post_json(&app, "/v1/completions", json!({"prompt": "Hi", "stop": "quick b"})).await.json();
    assert_eq!(r["choices"][0]["text"], "You said: Hi. The ");
}

#[tokio::test]
async fn completion_accepts_token_ids_and_lists() {
    let app = app(fast_mock());
    // "Hi" in the mock's byte vocabulary: BOS, 'H' + 3, 'i' + 3.
    let ids = json!([1, 72 + 3, 105 + 3]);
    let by_ids = post_json(&app, "/v1/completions", json!({"prompt": ids, "max_tokens": 4})).await.json();
    let by_text = post_json(&app, "/v1/completions", json!({"prompt": ["Hi"], "max_tokens": 4})).await.json();
    assert_eq!(by_ids["choices"][0]["text"], by_text["choices"][0]["text"]);
    assert_eq!(by_ids["usage"]["prompt_tokens"], 3);
    let r = post_json(&app, "/v1/completions", json!({"prompt": [[1, 9999]]})).await;
    assert!(r.error(StatusCode::BAD_REQUEST)["message"].as_str().unwrap().contains("9999"));
}

#[tokio::test]
async fn chat_completion_answers_the_last_message() {
    let app = app(fast_mock());
    let body = json!({
        "model": "gpt-4o", "user": "someone", "unknown_field": {"x": 1},
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "hello"},
                                         {"type": "text", "text": "world"}]},
        ],
    });
    let r = post_json(&app, "/v1/chat/completions", body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let body = r.json();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    // The parts are joined with a newline; the mock echoes the last turn.
    assert_eq!(choice["message"]["content"], format!("You said: hello\nworld. {PANGRAM}"));
    assert_eq!(choice["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn chat_max_completion_tokens_wins_over_max_tokens() {
    let app = app(fast_mock());
    let messages = json!([{"role": "user", "content": "hi"}]);
    let r = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 5, "max_completion_tokens": 2}),
    )
    .await
    .json();
    assert_eq!(r["choices"][0]["message"]["content"], "You said:");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn sampling_parameters_reach_the_engine() {
    let engine = fast_mock();
    let app = app(engine.clone());
    let r = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.05,
               "seed": 42, "frequency_penalty": 0.25, "presence_penalty": -0.5, "stop": ["a", "b"],
               "logprobs": 2}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let req = engine.last_request().unwrap();
    assert_eq!(req.prompt_ids, vec![1, b'x' as u32 + 3]);
    assert_eq!((req.max_tokens, req.temperature, req.top_p, req.top_k, req.min_p), (4, 0.5, 0.9, 7, 0.05));
    assert_eq!((req.seed, req.frequency_penalty, req.presence_penalty), (Some(42), 0.25, -0.5));
    assert_eq!(req.stop, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(req.logprobs, Some(2));

    // Without max_tokens: what the context leaves (512 - 2 prompt tokens).
    post_json(&app, "/v1/completions", json!({"prompt": "x"})).await;
    let req = engine.last_request().unwrap();
    assert_eq!((req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed), (510, 1.0, 1.0, 0, None));
    assert_eq!(req.logprobs, None);

    // A configured default applies under the context's room.
    let app = app_with(engine.clone(), ServerConfig { default_max_tokens: Some(16), ..Default::default() });
    post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true}),
    )
    .await;
    let req = engine.last_request().unwrap();
    assert_eq!((req.max_tokens, req.logprobs), (16, Some(0)));
}

#[tokio::test]
async fn logprobs_in_both_shapes() {
    let app = app(fast_mock());
    let r = post_json(&app, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 3, "logprobs": 2}))
        .await
        .json();
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["You", " said:", " Hi."]));
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lp["text_offset"], json!([0, 3, 9]));
    let top0 = lp["top_logprobs"][0].as_object().unwrap();
    assert_eq!(top0.len(), 2);
    assert!(top0.contains_key("You") && top0.contains_key("alt1"));

    let messages = json!([{"role": "user", "content": "Hi"}]);
    let r = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 2, "logprobs": true, "top_logprobs": 3}),
    )
    .await
    .json();
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 2);
    assert_eq!(content[1]["token"], " said:");
    assert_eq!(content[1]["bytes"], json!(" said:".as_bytes()));
    assert_eq!(content[1]["top_logprobs"].as_array().unwrap().len(), 3);
    assert!(content[1]["logprob"].as_f64().unwrap() <= 0.0);
}

#[tokio::test]
async fn streamed_completion_matches_the_whole_one() {
    let app = app(fast_mock());
    let whole = post_json(&app, "/v1/completions", json!({"prompt": "Hi", "stop": "lazy"})).await.json();
    let r = post_json(&app, "/v1/completions", json!({"prompt": "Hi", "stop": "lazy", "stream": true})).await;
    assert_eq!(r.status, StatusCode::OK);
    let events = r.events();
    let text: String = events.iter().map(|e| e["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one id per stream");
    for e in &events {
        assert_eq!(e["object"], "text_completion");
        assert!(e.get("usage").is_none(), "no usage unless asked");
    }
    let (last, tokens) = events.split_last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert!(tokens.iter().all(|e| e["choices"][0]["finish_reason"].is_null()));
}

#[tokio::test]
async fn streamed_chat_starts_with_the_role_and_ends_with_usage() {
    let app = app(fast_mock());
    let body = json!({"messages": [{"role": "user", "content": "Hey"}], "stream": true, "max_tokens": 4,
                      "stream_options": {"include_usage": true}});
    let events = post_json(&app, "/v1/chat/completions", body).await.events();
    assert_eq!(events[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    for e in &events {
        assert_eq!(e["object"], "chat.completion.chunk");
    }
    let content: String =
        events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "You said: Hey. The");
    let n = events.len();
    assert_eq!(events[n - 2]["choices"][0]["delta"], json!({}));
    assert_eq!(events[n - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(events[n - 2]["usage"], Value::Null);
    assert_eq!(events[n - 1]["choices"], json!([]));
    assert_eq!(events[n - 1]["usage"]["completion_tokens"], 4);
    assert_eq!(
        events[n - 1]["usage"]["total_tokens"],
        events[n - 1]["usage"]["prompt_tokens"].as_u64().unwrap() + 4
    );
}

#[tokio::test]
async fn streamed_logprobs_come_with_each_chunk() {
    let app = app(fast_mock());
    let body = json!({"messages": [{"role": "user", "content": "Hey"}], "stream": true, "max_tokens": 2,
                      "logprobs": true, "top_logprobs": 1});
    let events = post_json(&app, "/v1/chat/completions", body).await.events();
    let tokens: Vec<&Value> =
        events.iter().filter(|e| e["choices"][0]["delta"]["content"].is_string()).skip(1).collect();
    assert_eq!(tokens.len(), 2);
    for e in tokens {
        let content = e["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 1);
        assert_eq!(content[0]["token"], e["choices"][0]["delta"]["content"]);
    }
}

#[tokio::test]
async fn bad_requests_are_400_in_openai_shape() {
    let app = app(fast_mock());
    let r = post(&app, "/v1/completions", "{\"prompt\": ").await;
    let err = r.error(StatusCode::BAD_REQUEST);
    assert_eq!(err["type"], "invalid_request_error");
    assert!(err["message"].as_str().unwrap().contains("not valid JSON"));
    let messages = json!([{"role": "user", "content": "x"}]);
    for (path, body, param) in [
        ("/v1/completions", json!({"prompt": "a", "temperature": -1}), "temperature"),
        ("/v1/completions", json!({"prompt": "a", "temperature": "warm"}), "temperature"),
        ("/v1/completions", json!({"prompt": "a", "top_p": 0}), "top_p"),
        ("/v1/completions", json!({"prompt": "a", "max_tokens": 0}), "max_tokens"),
        ("/v1/completions", json!({"prompt": "a", "max_tokens": 600}), "max_tokens"),
        ("/v1/completions", json!({"prompt": "a", "n": 2}), "n"),
        ("/v1/completions", json!({"prompt": 12}), "prompt"),
        ("/v1/completions", json!({"prompt": "a".repeat(600)}), "prompt"),
        (
            "/v1/chat/completions",
            json!({"messages": messages, "max_completion_tokens": -1}),
            "max_completion_tokens",
        ),
        ("/v1/chat/completions", json!({"messages": messages, "stop": ["1", "2", "3", "4", "5"]}), "stop"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        ("/v1/chat/completions", json!({"messages": messages, "stream": 1}), "stream"),
    ] {
        let r = post_json(&app, path, body.clone()).await;
        let err = r.error(StatusCode::BAD_REQUEST);
        assert_eq!(err["param"], param, "{body}: {}", r.body);
    }
    let r = post_json(&app, "/v1/completions", json!({"prompt": "a".repeat(600)})).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST)["code"], "context_length_exceeded");
    let r = post_json(&app, "/v1/completions", json!({"prompt": "abc", "max_tokens": 509})).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST)["code"], "context_length_exceeded");
    assert_eq!(
        post_json(&app, "/v1/completions", json!({"prompt": "abc", "max_tokens": 508})).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn api_key_guards_v1_only() {
    let cfg = ServerConfig { api_key: Some("sekret".into()), ..Default::default() };
    let app = app_with(fast_mock(), cfg);
    let body = json!({"prompt": "a", "max_tokens": 1}).to_string();
    let with_auth = |auth: Option<&str>| {
        let mut req = Request::post("/v1/completions").header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        req.body(Body::from(body.clone())).unwrap()
    };
    let err = send(&app, with_auth(None)).await.error(StatusCode::UNAUTHORIZED);
    assert_eq!(err["type"], "authentication_error");
    send(&app, with_auth(Some("Bearer wrong"))).await.error(StatusCode::UNAUTHORIZED);
    send(&app, with_auth(Some("sekret"))).await.error(StatusCode::UNAUTHORIZED);
    assert_eq!(send(&app, with_auth(Some("Bearer sekret"))).await.status, StatusCode::OK);
    get(&app, "/v1/models").await.error(StatusCode::UNAUTHORIZED);
    for open in ["/health", "/metrics", "/"] {
        assert_eq!(get(&app, open).await.status, StatusCode::OK, "{open}");
    }
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let cfg = ServerConfig { max_body_bytes: 1000, ..Default::default() };
    let app = app_with(fast_mock(), cfg);
    let big = json!({"prompt": "a".repeat(2000)}).to_string();
    let err = post(&app, "/v1/completions", big.clone()).await.error(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(err["code"], "request_too_large");
    // Without a Content-Length: counted while read.
    let chunks: Vec<Result<String, std::io::Error>> =
        big.as_bytes().chunks(100).map(|c| Ok(String::from_utf8(c.to_vec()).unwrap())).collect();
    let streamed = Body::from_stream(futures_util::stream::iter(chunks));
    post(&app, "/v1/chat/completions", streamed).await.error(StatusCode::PAYLOAD_TOO_LARGE);
    let small = json!({"prompt": "a", "max_tokens": 1}).to_string();
    assert_eq!(post(&app, "/v1/completions", small).await.status, StatusCode::OK);
}

#[tokio::test]
async fn full_queue_is_429_and_shutdown_is_503() {
    let engine = mock(MockConfig {
        max_running: 1,
        max_queued: 0,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    });
    let app = app(engine.clone());
    // A streamed request holds the only slot while its body is not read.
    let first = app
        .clone()
        .oneshot(
            Request::post("/v1/completions")
                .body(Body::from(json!({"prompt": "a", "stream": true}).to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let err =
        post_json(&app, "/v1/completions", json!({"prompt": "b"})).await.error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(err["type"], "rate_limit_error");
    drop(first);
    engine.shutdown();
    let err = post_json(&app, "/v1/completions", json!({"prompt": "b"}))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(err["message"].as_str().unwrap().contains("shutting down"));
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let app = app(fast_mock());
    get(&app, "/v2/nothing").await.error(StatusCode::NOT_FOUND);
    get(&app, "/v1/completions").await.error(StatusCode::METHOD_NOT_ALLOWED);
    post(&app, "/v1/models", "{}").await.error(StatusCode::METHOD_NOT_ALLOWED);
    post(&app, "/health", "{}").await.error(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_panicking_handler_is_500_and_the_server_goes_on() {
    let app = app(fast_mock());
    let err = post_json(&app, "/v1/completions", json!({"prompt": "__panic__"}))
        .await
        .error(StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(err["type"], "server_error");
    assert!(err["message"].as_str().unwrap().contains("panicked"));
    let r = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "__panic__"}]}),
    )
    .await;
    r.error(StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        post_json(&app, "/v1/completions", json!({"prompt": "a", "max_tokens": 1})).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn engine_errors_reach_the_client() {
    let app = app(fast_mock());
    let err = post_json(&app, "/v1/completions", json!({"prompt": "__error__"}))
        .await
        .error(StatusCode::INTERNAL_SERVER_ERROR);
    assert!(err["message"].as_str().unwrap().contains("__error__"));
    // Streaming: the tokens so far, an error event, then [DONE].
    let events =
        post_json(&app, "/v1/completions", json!({"prompt": "__error__", "stream": true})).await.events();
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[2]["error"]["type"], "server_error");
}

#[tokio::test]
async fn dropping_a_stream_cancels_the_sequence() {
    let engine = mock(MockConfig { token_delay: Duration::from_millis(5), ..Default::default() });
    let app = app(engine.clone());
    let response = app
        .clone()
        .oneshot(
            Request::post("/v1/completions")
                .body(Body::from(json!({"prompt": "a", "stream": true}).to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body().into_data_stream();
    use futures_util::StreamExt;
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(body);
    wait_until(|| engine.counters().cancelled == 1).await;
    assert_eq!(engine.stats().running, 0);
    assert_eq!(engine.stats().kv_blocks_used, 0);
    assert_eq!(engine.counters().finished, 0);
}

async fn wait_until(cond: impl Fn() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not met within 2 s");
}

#[tokio::test]
async fn health_and_chat_page() {
    let app = app(fast_mock());
    let r = get(&app, "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.starts_with("application/json"));
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(r.json()["model"], "mock-bitnet");
    let page = get(&app, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.content_type.starts_with("text/html"));
    assert!(page.body.contains("<title>BitNet chat</title>"));
    assert!(page.body.contains("/v1/chat/completions"));
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "the page loads nothing from elsewhere"
    );
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_latencies() {
    let engine = fast_mock();
    let app = app(engine.clone());
    post_json(&app, "/v1/completions", json!({"prompt": "abc", "max_tokens": 3})).await;
    post_json(&app, "/v1/completions", json!({"prompt": "abcd", "max_tokens": 2, "stream": true})).await;
    post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    )
    .await;
    post_json(&app, "/v1/completions", json!({"prompt": "a", "top_p": 7})).await;
    get(&app, "/nowhere").await;
    let r = get(&app, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.starts_with("text/plain; version=0.0.4"));
    let value = |name: &str| -> f64 {
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in\n{}", r.body))
            .parse()
            .unwrap()
    };
    assert_eq!(value("bitnet_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"), 2.0);
    assert_eq!(value("bitnet_http_requests_total{endpoint=\"/v1/completions\",status=\"400\"}"), 1.0);
    assert_eq!(value("bitnet_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}"), 1.0);
    assert_eq!(value("bitnet_http_requests_total{endpoint=\"other\",status=\"404\"}"), 1.0);
    let chat_prompt = MockEngine::default()
        .encode_chat(&[bitnet_server::ChatTurn { role: "user".into(), content: "hi".into() }])
        .unwrap()
        .len() as f64;
    assert_eq!(value("bitnet_prompt_tokens_total"), 4.0 + 5.0 + chat_prompt);
    assert_eq!(value("bitnet_completion_tokens_total"), 6.0);
    assert_eq!(value("bitnet_time_to_first_token_seconds_count"), 3.0);
    assert_eq!(value("bitnet_inter_token_latency_seconds_count"), 3.0); // (3 - 1) + (2 - 1) + 0
    assert_eq!(value("bitnet_request_duration_seconds_count{endpoint=\"/v1/completions\"}"), 2.0);
    assert_eq!(value("bitnet_request_duration_seconds_count{endpoint=\"/v1/chat/completions\"}"), 1.0);
    assert_eq!(value("bitnet_requests_in_flight"), 0.0);
    assert_eq!(value("bitnet_running_sequences"), 0.0);
    assert_eq!(value("bitnet_queued_sequences"), 0.0);
    assert_eq!(value("bitnet_kv_blocks_used"), 0.0);
    assert_eq!(value("bitnet_kv_blocks_free"), 1024.0);
    assert!(r.body.contains("# TYPE bitnet_time_to_first_token_seconds histogram"));
}

/// What the mock embeds for `ids`: bucket counts (`id % 8`), L2-normalized.
fn mock_embedding(ids: &[u32]) -> Vec<f32> {
    let mut v = [0f32; 8];
    ids.iter().for_each(|&id| v[id as usize % 8] += 1.0);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

/// The mock tokenizer's ids for `text`: BOS, then each byte + 3.
fn mock_ids(text: &str) -> Vec<u32> {
    std::iter::once(1).chain(text.bytes().map(|b| u32::from(b) + 3)).collect()
}

#[tokio::test]
async fn embeddings_in_every_input_form_and_both_encodings() {
    let app = app(fast_mock());
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    // One string.
    let r = post_json(&app, "/v1/embeddings", json!({"input": "hello", "model": "m"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["index"], 0);
    assert_eq!(floats(&v["data"][0]["embedding"]), mock_embedding(&mock_ids("hello")));
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["total_tokens"], 6);
    // Several strings, token ids, lists of token ids: one vector each, in order.
    let r = post_json(&app, "/v1/embeddings", json!({"input": ["a", "bc"]})).await;
    let v = r.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(floats(&v["data"][1]["embedding"]), mock_embedding(&mock_ids("bc")));
    assert_eq!(v["data"][1]["index"], 1);
    let r = post_json(&app, "/v1/embeddings", json!({"input": [5, 6, 7]})).await;
    assert_eq!(floats(&r.json()["data"][0]["embedding"]), mock_embedding(&[5, 6, 7]));
    let r = post_json(&app, "/v1/embeddings", json!({"input": [[5], [6, 14]]})).await;
    assert_eq!(floats(&r.json()["data"][1]["embedding"]), mock_embedding(&[6, 14]));
    // base64: the little-endian f32 bytes.
    let r = post_json(&app, "/v1/embeddings", json!({"input": "hello", "encoding_format": "base64"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let text = r.json()["data"][0]["embedding"].as_str().unwrap().to_string();
    let bytes = decode_base64(&text);
    let got: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(got, mock_embedding(&mock_ids("hello")));
    // `dimensions` equal to the model's width is accepted.
    let r = post_json(&app, "/v1/embeddings", json!({"input": "x", "dimensions": 8})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// Standard base64 with padding, decoded by hand (the test's own reference).
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for quad in text.as_bytes().chunks(4) {
        let n = quad.iter().filter(|&&c| c != b'=').fold(0u32, |n, &c| n << 6 | u32::from(value(c)));
        let pad = quad.iter().filter(|&&c| c == b'=').count();
        let n = n << (6 * pad);
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..3 - pad]);
    }
    out
}

#[tokio::test]
async fn embeddings_refuse_bad_input_naming_the_field() {
    let app = app(fast_mock());
    let cases = [
        (json!({}), "input", "required"),
        (json!({"input": []}), "input", "empty"),
        (json!({"input": ["a", ""]}), "input", "input 1 is empty"),
        (json!({"input": [[1], []]}), "input", "input 1 is empty"),
        (json!({"input": 3}), "input", "must be a string"),
        (json!({"input": [1, -2]}), "input", "token ids"),
        (json!({"input": ["a", 2]}), "input", "must be a string"),
        (json!({"input": "a", "encoding_format": "int8"}), "encoding_format", "float"),
        (json!({"input": "a", "dimensions": 0}), "dimensions", ""),
        (json!({"input": "a", "dimensions": 64}), "dimensions", "8 dimensions"),
        (json!({"input": [9999]}), "", "outside the vocabulary"),
    ];
    for (body, param, words) in cases {
        let r = post_json(&app, "/v1/embeddings", body.clone()).await;
        let err = r.error(StatusCode::BAD_REQUEST);
        if !param.is_empty() {
            assert_eq!(err["param"], param, "{body}: {}", r.body);
        }
        assert!(err["message"].as_str().unwrap().contains(words), "{body}: {}", r.body);
    }
    // Longer than the context.
    let long = "x".repeat(5000);
    let r = post_json(&app, "/v1/embeddings", json!({"input": long})).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST)["code"], "context_length_exceeded");
    let r = post(&app, "/v1/embeddings", "{not json").await;
    r.error(StatusCode::BAD_REQUEST);
}
