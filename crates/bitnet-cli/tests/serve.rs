//! `bitnet serve` with the embedded model, over a real socket: completions, chat, errors,
//! metrics back to zero KV blocks, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Starts the server on a free port and returns it with its address.
fn start(extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["serve", "--port", "0", "--max-seqs", "4", "-t", "2"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bitnet serve starts");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "serve exited before listening");
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    (child, addr)
}

/// One HTTP/1.1 request; returns the status and the body.
fn request(addr: &str, method: &str, path: &str, body: &str, headers: &[&str]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn serve_answers_openai_requests_and_stops_cleanly() {
    let (mut child, addr) = start(&["--api-key", "sekrit"]);
    let auth = "Authorization: Bearer sekrit";
    let (status, _) = request(&addr, "GET", "/health", "", &[]);
    assert_eq!(status, 200);
    let (status, body) = request(&addr, "GET", "/v1/models", "", &[]);
    assert_eq!(status, 401, "{body}");
    let completion = r#"{"prompt": "It is a truth", "max_tokens": 8, "temperature": 0}"#;
    let (status, body) = request(&addr, "POST", "/v1/completions", completion, &[auth]);
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    // Greedy: the same text as `bitnet generate` gives.
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["generate", "-p", "It is a truth", "-n", "8", "--temperature", "0", "--json"])
        .output()
        .unwrap();
    let local: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["choices"][0]["text"], local["text"]);
    let chat = r#"{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": true}"#;
    let (status, body) = request(&addr, "POST", "/v1/chat/completions", chat, &[auth]);
    assert_eq!(status, 200);
    assert!(body.contains("data: [DONE]"), "{body}");
    let (status, body) =
        request(&addr, "POST", "/v1/completions", r#"{"prompt": "x", "temperature": -1}"#, &[auth]);
    assert_eq!(status, 400, "{body}");
    let (status, _) = request(&addr, "POST", "/v1/completions", "{not json", &[auth]);
    assert_eq!(status, 400);
    let long = format!(r#"{{"prompt": "{}", "max_tokens": 4}}"#, "word ".repeat(400));
    let (status, body) = request(&addr, "POST", "/v1/completions", &long, &[auth]);
    assert_eq!(status, 400, "a prompt over the context: {body}");
    let (_, metrics) = request(&addr, "GET", "/metrics", "", &[]);
    assert!(metrics.contains("bitnet_kv_blocks_used 0"), "{metrics}");
    // SIGTERM: a graceful stop, exit 0.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// Clients that hang up mid-stream (half-close, then close with bytes unread, as a browser's
/// Stop can): the server's next writes fail with EPIPE, and it must go on serving. The CLI
/// restores SIGPIPE's default for its pipe-writing commands (`bitnet inspect m | head -1`);
/// given to `serve`, it killed the server on the first such write (exit 141) — the chat page's
/// Stop did it in CI.
#[test]
fn clients_that_hang_up_mid_stream_do_not_kill_the_server() {
    let (mut child, addr) = start(&[]);
    let chat = r#"{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200, "stream": true}"#;
    for i in 0..40u64 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{chat}",
            chat.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut first = [0u8; 64];
        assert!(s.read(&mut first).unwrap() > 0, "no response");
        // Hang up at a different point of the stream each time.
        std::thread::sleep(Duration::from_millis(i * 37 % 50));
        s.shutdown(std::net::Shutdown::Write).unwrap();
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(child.try_wait().unwrap(), None, "the server died");
    let (status, _) = request(&addr, "GET", "/health", "", &[]);
    assert_eq!(status, 200);
    stop(&mut child);
}

/// `/v1/embeddings` of an embedding checkpoint equals `bitnet embed --json`, number for number,
/// with generation still served beside it; a checkpoint declaring mean pooling is a 400.
#[test]
fn embeddings_equal_bitnet_embed() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-embed-tiny/master");
    let model = fixture.to_str().unwrap();
    let (mut child, addr) = start(&["--model", model, "--ctx", "64"]);
    let texts = ["query: what is a ternary weight?", "A weight in {-1, 0, +1}."];
    let body = serde_json::json!({"input": texts}).to_string();
    let (status, body) = request(&addr, "POST", "/v1/embeddings", &body, &[]);
    assert_eq!(status, 200, "{body}");
    let served = json(&body);
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["embed", "--model", model, "--json", "-t", "2", "--input", texts[0], "--input", texts[1]])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli = json(&String::from_utf8(out.stdout).unwrap());
    for i in 0..2 {
        assert_eq!(served["data"][i]["embedding"], cli["data"][i]["embedding"], "text {i}");
    }
    assert_eq!(served["usage"], cli["usage"]);
    // Generation goes on beside it.
    let completion = r#"{"prompt": "hello", "max_tokens": 2, "temperature": 0}"#;
    let (status, body) = request(&addr, "POST", "/v1/completions", completion, &[]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = request(&addr, "POST", "/v1/embeddings", r#"{"input": ""}"#, &[]);
    assert_eq!(status, 400, "{body}");
    stop(&mut child);

    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    std::fs::write(dir.path().join("1_Pooling/config.json"), r#"{"pooling_mode_mean_tokens": true}"#)
        .unwrap();
    let (mut child, addr) = start(&["--model", dir.path().to_str().unwrap(), "--ctx", "64"]);
    let (status, body) = request(&addr, "POST", "/v1/embeddings", r#"{"input": "hello"}"#, &[]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("declares mean pooling"), "{body}");
    stop(&mut child);
}

/// Stops a server with SIGTERM and waits for it.
fn stop(child: &mut Child) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    child.wait().unwrap();
}
