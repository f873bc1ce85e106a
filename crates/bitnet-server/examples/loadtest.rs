//! Load test for `bitnet serve` (or `mock_serve`): N requests, C at a time, a mix of valid
//! requests (completions and chat, streamed or not), malformed or out-of-range ones, oversized
//! bodies, and streaming clients that hang up midway. Checks that the server never drops a
//! connection without an answer, answers every valid request 200 and every bad one 4xx, and
//! that once the load is gone `/metrics` shows no running sequence and no KV block in use.
//!
//! ```text
//! cargo run --release -p bitnet-server --example loadtest -- --url http://127.0.0.1:8080 \
//!     --requests 500 --concurrency 32 [--api-key K] [--pid PID] [--max-body-bytes 4194304]
//! ```
//!
//! Other options: `--bad-fraction F` (0.1), `--oversize-fraction F` (0.05), `--disconnect-fraction
//! F` (0.1), `--stream-fraction F` (0.5), `--max-tokens N` (16), `--seed S`, `--timeout-s S` (120),
//! `--settle-s S` (10: how long to wait for the engine to drain). `--pid` prints the server's
//! resident memory before and after (from /proc/PID/status). Only loopback targets are accepted.
//! Exits 0 when every check passes, 1 when one fails, 2 on bad options.

#[path = "../tests/support/http_client.rs"]
mod http_client;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use http_client::{open_stream, request, HttpResponse};

struct Options {
    addr: SocketAddr,
    requests: usize,
    concurrency: usize,
    bad_fraction: f64,
    oversize_fraction: f64,
    disconnect_fraction: f64,
    stream_fraction: f64,
    max_tokens: usize,
    max_body_bytes: usize,
    api_key: Option<String>,
    pid: Option<u32>,
    seed: u64,
    timeout: Duration,
    settle: Duration,
}

/// What one request is meant to test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Valid,
    ValidStream,
    Disconnect,
    Malformed,
    Oversized,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Valid => "valid",
            Kind::ValidStream => "valid, streamed",
            Kind::Disconnect => "stream, client hangs up",
            Kind::Malformed => "malformed or bad value",
            Kind::Oversized => "oversized body",
        }
    }
}

/// One request's result.
struct Outcome {
    kind: Kind,
    /// `Err` when the answer was wrong or missing, saying how.
    result: Result<(), String>,
    latency: Duration,
}

fn main() {
    let opts = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let passed = runtime.block_on(run(opts));
    std::process::exit(if passed { 0 } else { 1 });
}

async fn run(opts: Options) -> bool {
    let opts = Arc::new(opts);
    let rss_before = opts.pid.and_then(resident_kib);
    let kinds = plan(&opts);
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(kinds.len())));
    let kinds = Arc::new(kinds);
    let started = Instant::now();
    let workers: Vec<_> = (0..opts.concurrency.max(1))
        .map(|_| {
            let (opts, kinds, next, outcomes) = (opts.clone(), kinds.clone(), next.clone(), outcomes.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&kind) = kinds.get(i) else { break };
                    let outcome = one_request(&opts, i, kind).await;
                    outcomes.lock().unwrap().push(outcome);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());

    println!(
        "{} requests in {:.2} s ({:.1} req/s), {} at a time",
        outcomes.len(),
        elapsed.as_secs_f64(),
        outcomes.len() as f64 / elapsed.as_secs_f64(),
        opts.concurrency
    );
    let mut failures = Vec::new();
    for kind in [Kind::Valid, Kind::ValidStream, Kind::Disconnect, Kind::Malformed, Kind::Oversized] {
        let of_kind: Vec<&Outcome> = outcomes.iter().filter(|o| o.kind == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        let mut latencies: Vec<Duration> = of_kind.iter().map(|o| o.latency).collect();
        latencies.sort();
        let failed: Vec<&String> = of_kind.iter().filter_map(|o| o.result.as_ref().err()).collect();
        println!(
            "  {:<26} {:>6} ok {:>4} failed   p50 {:>8.1} ms  p95 {:>8.1} ms  max {:>8.1} ms",
            kind.name(),
            of_kind.len() - failed.len(),
            failed.len(),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.95),
            percentile(&latencies, 1.0),
        );
        failures.extend(failed.into_iter().map(|f| format!("{}: {f}", kind.name())));
    }

    let health = get(&opts, "/health").await;
    match &health {
        Ok(r) if r.status == 200 => println!("server alive: /health 200"),
        Ok(r) => failures.push(format!("/health answered {} after the load", r.status)),
        Err(e) => failures.push(format!("the server no longer answers /health: {e}")),
    }
    match settled_metrics(&opts).await {
        Ok(m) => println!(
            "after the load: running {} queued {} in flight {} KV blocks used {} (free {})",
            m.running, m.queued, m.in_flight, m.kv_used, m.kv_free
        ),
        Err(e) => failures.push(e),
    }
    if let Some(pid) = opts.pid {
        match (rss_before, resident_kib(pid)) {
            (Some(before), Some(after)) => println!(
                "server RSS: {:.1} MiB before, {:.1} MiB after ({:+.1} MiB)",
                before as f64 / 1024.0,
                after as f64 / 1024.0,
                (after as f64 - before as f64) / 1024.0
            ),
            _ => println!("server RSS: cannot read /proc/{pid}/status"),
        }
    }
    if failures.is_empty() {
        println!("PASS: every valid request 200, every bad one 4xx, nothing left running");
        true
    } else {
        println!("FAIL: {} problems", failures.len());
        for f in failures.iter().take(20) {
            println!("  {f}");
        }
        false
    }
}

/// The kind of every request, in a random but reproducible order.
fn plan(opts: &Options) -> Vec<Kind> {
    let mut rng = opts.seed.max(1);
    (0..opts.requests)
        .map(|_| {
            let x = next_uniform(&mut rng);
            let bounds = [
                (opts.bad_fraction, Kind::Malformed),
                (opts.oversize_fraction, Kind::Oversized),
                (opts.disconnect_fraction, Kind::Disconnect),
            ];
            let mut acc = 0.0;
            for (fraction, kind) in bounds {
                acc += fraction;
                if x < acc {
                    return kind;
                }
            }
            if next_uniform(&mut rng) < opts.stream_fraction {
                Kind::ValidStream
            } else {
                Kind::Valid
            }
        })
        .collect()
}

/// A uniform number in [0, 1) from a xorshift generator.
fn next_uniform(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

fn headers(opts: &Options) -> Vec<(&'static str, String)> {
    let mut h = vec![("Content-Type", "application/json".to_string())];
    if let Some(k) = &opts.api_key {
        h.push(("Authorization", format!("Bearer {k}")));
    }
    h
}

async fn post(opts: &Options, path: &str, body: &[u8]) -> std::io::Result<HttpResponse> {
    let h = headers(opts);
    let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
    request(opts.addr, "POST", path, &h, body).await
}

async fn get(opts: &Options, path: &str) -> std::io::Result<HttpResponse> {
    let h = headers(opts);
    let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
    request(opts.addr, "GET", path, &h, b"").await
}

/// A valid body for request `i`: completions or chat, alternately.
fn valid_body(opts: &Options, i: usize, stream: bool) -> (&'static str, Vec<u8>) {
    let prompt = format!("Request {i}: tell me about ternary weights.");
    if i.is_multiple_of(2) {
        let body = json!({"prompt": prompt, "max_tokens": opts.max_tokens, "stream": stream,
                          "temperature": 0.7, "seed": i});
        ("/v1/completions", body.to_string().into_bytes())
    } else {
        let body = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": opts.max_tokens,
                          "stream": stream, "stream_options": {"include_usage": true}});
        ("/v1/chat/completions", body.to_string().into_bytes())
    }
}

/// A bad body for request `i`, one of several ways.
fn malformed_body(i: usize) -> (&'static str, Vec<u8>) {
    let bodies: [(&str, String); 6] = [
        ("/v1/completions", "{\"prompt\": \"unterminated".to_string()),
        ("/v1/completions", json!({"prompt": "x", "temperature": -1}).to_string()),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": "many"}).to_string()),
        ("/v1/chat/completions", json!({"messages": []}).to_string()),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}).to_string(),
        ),
        ("/v1/chat/completions", "[1, 2, 3]".to_string()),
    ];
    let (path, body) = &bodies[i % bodies.len()];
    (path, body.clone().into_bytes())
}

async fn one_request(opts: &Options, i: usize, kind: Kind) -> Outcome {
    let started = Instant::now();
    let result = match tokio::time::timeout(opts.timeout, check(opts, i, kind)).await {
        Ok(r) => r,
        Err(_) => Err(format!("request {i}: no answer within {:?}", opts.timeout)),
    };
    Outcome { kind, result, latency: started.elapsed() }
}

/// Sends request `i` and checks its answer.
async fn check(opts: &Options, i: usize, kind: Kind) -> Result<(), String> {
    let fail = |what: String| format!("request {i}: {what}");
    match kind {
        Kind::Valid | Kind::ValidStream => {
            let (path, body) = valid_body(opts, i, kind == Kind::ValidStream);
            let r = post(opts, path, &body).await.map_err(|e| fail(format!("no answer: {e}")))?;
            if r.status != 200 {
                return Err(fail(format!("status {}: {}", r.status, r.text())));
            }
            if kind == Kind::Valid {
                let v = r.json_checked().map_err(fail)?;
                if v["choices"][0]["finish_reason"].is_null() {
                    return Err(fail(format!("no finish_reason: {v}")));
                }
            } else {
                let data = r.sse_data();
                if data.last().map(String::as_str) != Some("[DONE]") {
                    return Err(fail("stream did not end with [DONE]".into()));
                }
                if let Some(e) = data.iter().find(|d| d.contains("\"error\"")) {
                    return Err(fail(format!("error event: {e}")));
                }
            }
            Ok(())
        }
        Kind::Disconnect => {
            let (path, body) = valid_body(opts, i, true);
            let h = headers(opts);
            let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let (status, stream, _) = open_stream(opts.addr, path, &h, &body, 2, opts.timeout)
                .await
                .map_err(|e| fail(e.to_string()))?;
            drop(stream);
            // A short answer can end before the client hangs up; either way it must be 200.
            if status != 200 {
                return Err(fail(format!("status {status}")));
            }
            Ok(())
        }
        Kind::Malformed => {
            let (path, body) = malformed_body(i);
            let r = post(opts, path, &body).await.map_err(|e| fail(format!("no answer: {e}")))?;
            expect_client_error(&r, 400).map_err(fail)
        }
        Kind::Oversized => {
            let filler = "a".repeat(opts.max_body_bytes + 1024);
            let body = json!({"prompt": filler}).to_string();
            let r = post(opts, "/v1/completions", body.as_bytes())
                .await
                .map_err(|e| fail(format!("no answer: {e}")))?;
            expect_client_error(&r, 413).map_err(fail)
        }
    }
}

fn expect_client_error(r: &HttpResponse, status: u16) -> Result<(), String> {
    if r.status != status {
        return Err(format!("status {} instead of {status}: {}", r.status, r.text()));
    }
    let v = r.json_checked()?;
    if v["error"]["message"].as_str().is_none_or(str::is_empty) {
        return Err(format!("no error message: {v}"));
    }
    Ok(())
}

trait JsonChecked {
    fn json_checked(&self) -> Result<serde_json::Value, String>;
}

impl JsonChecked for HttpResponse {
    fn json_checked(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("body is not JSON ({e}): {}", self.text()))
    }
}

struct Settled {
    running: u64,
    queued: u64,
    in_flight: u64,
    kv_used: u64,
    kv_free: u64,
}

/// Polls `/metrics` until nothing runs and no KV block is used, or `opts.settle` passes.
async fn settled_metrics(opts: &Options) -> Result<Settled, String> {
    let deadline = Instant::now() + opts.settle;
    loop {
        let text = get(opts, "/metrics").await.map_err(|e| format!("cannot read /metrics: {e}"))?.text();
        let value = |name: &str| -> Result<u64, String> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .ok_or_else(|| format!("/metrics has no {name}"))
        };
        let m = Settled {
            running: value("bitnet_running_sequences")?,
            queued: value("bitnet_queued_sequences")?,
            in_flight: value("bitnet_requests_in_flight")?,
            kv_used: value("bitnet_kv_blocks_used")?,
            kv_free: value("bitnet_kv_blocks_free")?,
        };
        if m.running == 0 && m.queued == 0 && m.kv_used == 0 && m.in_flight == 0 {
            return Ok(m);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{:?} after the load: running {} queued {} in flight {} KV blocks used {}",
                opts.settle, m.running, m.queued, m.in_flight, m.kv_used
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// VmRSS of a process, in KiB.
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// Milliseconds at quantile `q` of sorted latencies.
fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn parse_options() -> Result<Options, String> {
    let mut url = "http://127.0.0.1:8080".to_string();
    let mut opts = Options {
        addr: "127.0.0.1:8080".parse().unwrap(),
        requests: 200,
        concurrency: 16,
        bad_fraction: 0.1,
        oversize_fraction: 0.05,
        disconnect_fraction: 0.1,
        stream_fraction: 0.5,
        max_tokens: 16,
        max_body_bytes: 4 << 20,
        api_key: None,
        pid: None,
        seed: 0x5eed,
        timeout: Duration::from_secs(120),
        settle: Duration::from_secs(10),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let int =
            || value.parse::<u64>().map_err(|e| format!("{flag}: '{value}' is not a whole number: {e}"));
        let fraction = || match value.parse::<f64>() {
            Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
            _ => Err(format!("{flag}: '{value}' is not a fraction in [0, 1]")),
        };
        match flag.as_str() {
            "--url" => url = value.clone(),
            "--requests" => opts.requests = int()? as usize,
            "--concurrency" => opts.concurrency = int()? as usize,
            "--bad-fraction" => opts.bad_fraction = fraction()?,
            "--oversize-fraction" => opts.oversize_fraction = fraction()?,
            "--disconnect-fraction" => opts.disconnect_fraction = fraction()?,
            "--stream-fraction" => opts.stream_fraction = fraction()?,
            "--max-tokens" => opts.max_tokens = int()? as usize,
            "--max-body-bytes" => opts.max_body_bytes = int()? as usize,
            "--api-key" => opts.api_key = Some(value.clone()),
            "--pid" => opts.pid = Some(int()? as u32),
            "--seed" => opts.seed = int()?,
            "--timeout-s" => opts.timeout = Duration::from_secs(int()?),
            "--settle-s" => opts.settle = Duration::from_secs(int()?),
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    if opts.bad_fraction + opts.oversize_fraction + opts.disconnect_fraction > 1.0 {
        return Err("the bad, oversize and disconnect fractions add up to more than 1".into());
    }
    opts.addr = loopback_target(&url)?;
    Ok(opts)
}

/// The socket address of `http://HOST:PORT`, refused unless every address it names is loopback.
fn loopback_target(url: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let rest =
        url.strip_prefix("http://").ok_or_else(|| format!("--url must start with http://, got '{url}'"))?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    let addrs: Vec<SocketAddr> =
        host_port.to_socket_addrs().map_err(|e| format!("cannot resolve '{host_port}': {e}"))?.collect();
    match addrs.first() {
        Some(first) if addrs.iter().all(|a| a.ip().is_loopback()) => Ok(*first),
        Some(_) => Err(format!("refusing '{host_port}': the load test only targets loopback addresses")),
        None => Err(format!("'{host_port}' resolves to no address")),
    }
}
