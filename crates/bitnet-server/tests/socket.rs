//! The server over a real socket on 127.0.0.1 (port 0): requests, streams, a client that hangs
//! up midway, oversized bodies, panics, and graceful shutdown with and without its deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitnet_server::mock::{MockConfig, MockEngine, PANGRAM};
use bitnet_server::{Engine, Server, ServerConfig, ServerError};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod support;
use support::http_client::{open_stream, request, request_chunked, sse_data};

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    /// Triggers graceful shutdown; returns the task to await.
    fn shut_down(mut self) -> JoinHandle<Result<(), ServerError>> {
        let _ = self.stop.take().unwrap().send(());
        self.task
    }
}

async fn start(engine: Arc<MockEngine>, cfg: ServerConfig) -> Running {
    let cfg = ServerConfig { host: "127.0.0.1".into(), port: 0, ..cfg };
    let server = Server::bind(&cfg).await.unwrap();
    let addr = server.local_addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(engine, cfg, async {
        let _ = stopped.await;
    }));
    Running { addr, stop: Some(stop), task }
}

fn mock(token_delay: Duration) -> Arc<MockEngine> {
    Arc::new(MockEngine::new(MockConfig { token_delay, context_len: 4096, ..Default::default() }))
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> support::http_client::HttpResponse {
    request(addr, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
        .await
        .unwrap()
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn bind_rejects_bad_configs_and_reports_taken_ports() {
    let zero = ServerConfig { port: 0, max_body_bytes: 0, ..Default::default() };
    assert!(matches!(Server::bind(&zero).await, Err(ServerError::Config(_))));
    let empty_key = ServerConfig { port: 0, api_key: Some(" ".into()), ..Default::default() };
    assert!(matches!(Server::bind(&empty_key).await, Err(ServerError::Config(_))));
    let first = Server::bind(&ServerConfig { port: 0, ..Default::default() }).await.unwrap();
    let taken = ServerConfig { port: first.local_addr().port(), ..Default::default() };
    let err = Server::bind(&taken).await.err().unwrap();
    assert!(matches!(err, ServerError::Bind { .. }));
    assert!(err.to_string().contains(&taken.port.to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_over_a_real_socket() {
    let engine = mock(Duration::from_micros(200));
    let server = start(engine.clone(), ServerConfig::default()).await;
    let addr = server.addr;

    let health = request(addr, "GET", "/health", &[], b"").await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    let models = request(addr, "GET", "/v1/models", &[], b"").await.unwrap();
    assert_eq!(models.json()["data"][0]["id"], "mock-bitnet");

    let r = post(addr, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 100})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["text"], format!("You said: Hi. {PANGRAM}"));

    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Yo"}], "stream": true}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let data = r.sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let content: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect();
    assert_eq!(content, format!("You said: Yo. {PANGRAM}"));

    let bad = request(addr, "POST", "/v1/completions", &[], b"{oops").await.unwrap();
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");

    server.shut_down().await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "closed after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_mid_stream_cancels_its_sequence() {
    let engine = mock(Duration::from_millis(10));
    let server = start(engine.clone(), ServerConfig::default()).await;
    // Long enough that it cannot finish before the client goes: 4000 tokens at 10 ms.
    let body = json!({"prompt": "x", "max_tokens": 4000, "stream": true}).to_string();
    let (status, stream, text) =
        open_stream(server.addr, "/v1/completions", &[], body.as_bytes(), 3, Duration::from_secs(5))
            .await
            .unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("data: {"), "{text}");
    assert_eq!(engine.stats().running, 1);
    drop(stream);
    wait_until("the mock sees its receiver dropped", || engine.counters().cancelled == 1).await;
    assert_eq!(engine.counters().finished, 0);
    wait_until("the sequence frees its blocks", || {
        engine.stats().kv_blocks_used == 0 && engine.stats().running == 0
    })
    .await;
    // The server is unharmed.
    let r = post(server.addr, "/v1/completions", &json!({"prompt": "a", "max_tokens": 2})).await;
    assert_eq!(r.status, 200);
    let metrics = request(server.addr, "GET", "/metrics", &[], b"").await.unwrap().text();
    assert!(metrics.contains("bitnet_requests_in_flight 0\n"), "{metrics}");
    server.shut_down().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_panics_and_auth_over_a_socket() {
    let engine = mock(Duration::from_micros(100));
    let cfg = ServerConfig { max_body_bytes: 64 << 10, api_key: Some("k1".into()), ..Default::default() };
    let server = start(engine, cfg).await;
    let addr = server.addr;
    let auth = [("Authorization", "Bearer k1")];
    let big = json!({"prompt": "a".repeat(256 << 10)}).to_string();
    let r = request(addr, "POST", "/v1/completions", &auth, big.as_bytes()).await.unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    let r = request_chunked(addr, "/v1/completions", big.as_bytes()).await.unwrap();
    // No key: refused before the body is read.
    assert_eq!(r.status, 401, "{}", r.text());

    let panic = json!({"prompt": "__panic__"}).to_string();
    let r = request(addr, "POST", "/v1/completions", &auth, panic.as_bytes()).await.unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["type"], "server_error");
    let ok = json!({"prompt": "a", "max_tokens": 1}).to_string();
    assert_eq!(request(addr, "POST", "/v1/completions", &auth, ok.as_bytes()).await.unwrap().status, 200);
    let wrong = [("Authorization", "Bearer k2")];
    assert_eq!(request(addr, "POST", "/v1/completions", &wrong, ok.as_bytes()).await.unwrap().status, 401);
    assert_eq!(request(addr, "GET", "/health", &[], b"").await.unwrap().status, 200);
    server.shut_down().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_in_flight_streams_finish() {
    let engine = mock(Duration::from_millis(20));
    let cfg = ServerConfig { shutdown_grace: Duration::from_secs(10), ..Default::default() };
    let server = start(engine.clone(), cfg).await;
    let addr = server.addr;
    // 12 tokens at 20 ms: still running when shutdown begins.
    let body = json!({"prompt": "x", "max_tokens": 12, "stream": true}).to_string();
    let (status, mut stream, mut text) =
        open_stream(addr, "/v1/completions", &[], body.as_bytes(), 1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(status, 200);
    let task = server.shut_down();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no new connections once shutdown began");
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    text.push_str(&String::from_utf8_lossy(&rest));
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    task.await.unwrap().unwrap();
    assert_eq!(engine.counters().finished, 1);
    // serve called Engine::shutdown at the end.
    assert!(engine.submit(engine.last_request().unwrap()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_cancels_what_still_runs() {
    let engine = mock(Duration::from_millis(20));
    let cfg = ServerConfig { shutdown_grace: Duration::from_millis(200), ..Default::default() };
    let server = start(engine.clone(), cfg).await;
    let body = json!({"prompt": "x", "max_tokens": 3000, "stream": true}).to_string();
    let (_, mut stream, mut text) =
        open_stream(server.addr, "/v1/completions", &[], body.as_bytes(), 1, Duration::from_secs(5))
            .await
            .unwrap();
    let began = Instant::now();
    server.shut_down().await.unwrap().unwrap();
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(4), "{took:?}");
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    text.push_str(&String::from_utf8_lossy(&rest));
    let last_events: Vec<String> = sse_data(&text).into_iter().rev().take(2).collect();
    assert_eq!(last_events[0], "[DONE]", "{text}");
    assert!(last_events[1].contains("shutting down"), "{text}");
    assert_eq!(engine.counters().shut_down, 1);
    assert_eq!(engine.stats().running, 0);
}
