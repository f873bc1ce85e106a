//! Counters and histograms the HTTP layer keeps, rendered in Prometheus' text format by
//! `GET /metrics` together with the engine's load ([`EngineStats`]).
//!
//! Latencies are measured here, from the arrival times of the engine's events, so they include
//! queueing and whatever the engine does between tokens, as a client sees it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::EngineStats;

/// Bucket upper bounds (seconds) of the time-to-first-token histogram.
const TTFT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Bucket upper bounds (seconds) of the inter-token-latency histogram.
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Bucket upper bounds (seconds) of the request-duration histogram.
const DURATION_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// The endpoints metrics are labelled with; any other path counts as `other`, so that clients
/// probing random paths cannot grow the label set.
pub(crate) const KNOWN_ENDPOINTS: &[&str] =
    &["/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings"];

/// The server's own metrics.
pub struct Metrics {
    /// Responses by (endpoint, HTTP status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Generation requests (completions and chat) between their arrival and their last event.
    in_flight: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    /// Generation requests' durations, arrival to last event, by endpoint.
    request_duration: Mutex<BTreeMap<&'static str, Histogram>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            in_flight: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            request_duration: Mutex::default(),
        }
    }
}

impl Metrics {
    /// The label for a request path.
    pub(crate) fn endpoint_label(path: &str) -> &'static str {
        KNOWN_ENDPOINTS.iter().find(|e| **e == path).copied().unwrap_or("other")
    }

    /// Counts one response.
    pub(crate) fn record_response(&self, endpoint: &'static str, status: u16) {
        *lock(&self.requests).entry((endpoint, status)).or_insert(0) += 1;
    }

    pub(crate) fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_completion_token(&self) {
        self.completion_tokens.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn observe_time_to_first_token(&self, d: Duration) {
        self.time_to_first_token.observe(d.as_secs_f64());
    }

    pub(crate) fn observe_inter_token_latency(&self, d: Duration) {
        self.inter_token_latency.observe(d.as_secs_f64());
    }

    pub(crate) fn observe_request_duration(&self, endpoint: &'static str, d: Duration) {
        lock(&self.request_duration)
            .entry(endpoint)
            .or_insert_with(|| Histogram::new(DURATION_BUCKETS))
            .observe(d.as_secs_f64());
    }

    pub(crate) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Generation requests in progress in the HTTP layer.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Everything, in Prometheus' text exposition format (version 0.0.4).
    pub fn render(&self, stats: &EngineStats) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "bitnet_http_requests_total",
            "counter",
            "HTTP responses by endpoint and status code.",
        );
        for ((endpoint, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "bitnet_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            ("bitnet_prompt_tokens_total", "Prompt tokens submitted to the engine.", &self.prompt_tokens),
            (
                "bitnet_completion_tokens_total",
                "Tokens generated and received by the HTTP layer.",
                &self.completion_tokens,
            ),
        ];
        for (name, help, value) in counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let gauges = [
            ("bitnet_requests_in_flight", "Generation requests being answered.", self.in_flight() as usize),
            ("bitnet_running_sequences", "Sequences the engine is decoding.", stats.running),
            ("bitnet_queued_sequences", "Sequences waiting in the engine's queue.", stats.queued),
            ("bitnet_kv_blocks_used", "KV-cache blocks held by sequences.", stats.kv_blocks_used),
            ("bitnet_kv_blocks_free", "KV-cache blocks free.", stats.kv_blocks_free),
            ("bitnet_kv_blocks_total", "KV-cache blocks in all.", stats.kv_blocks_total),
            (
                "bitnet_kv_blocks_cached",
                "Free KV-cache blocks kept for prefix reuse.",
                stats.kv_blocks_cached,
            ),
        ];
        for (name, help, value) in gauges {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        let name = "bitnet_time_to_first_token_seconds";
        header(&mut out, name, "histogram", "Time from a request's arrival to its first token.");
        self.time_to_first_token.render(&mut out, name, "");
        let name = "bitnet_inter_token_latency_seconds";
        header(&mut out, name, "histogram", "Time between consecutive tokens of a request.");
        self.inter_token_latency.render(&mut out, name, "");
        let name = "bitnet_request_duration_seconds";
        header(&mut out, name, "histogram", "Generation requests' time from arrival to their last event.");
        for (endpoint, h) in lock(&self.request_duration).iter() {
            h.render(&mut out, name, &format!("endpoint=\"{endpoint}\""));
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Locks a mutex, taking the data even if a panicking thread poisoned it: these are plain
/// counters, always consistent between operations.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A cumulative histogram with fixed buckets.
struct Histogram {
    bounds: &'static [f64],
    data: Mutex<HistogramData>,
}

#[derive(Default)]
struct HistogramData {
    /// Observations at or under each bound (not yet cumulative).
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            data: Mutex::new(HistogramData { counts: vec![0; bounds.len()], ..Default::default() }),
        }
    }

    fn observe(&self, x: f64) {
        let mut d = lock(&self.data);
        if let Some(i) = self.bounds.iter().position(|b| x <= *b) {
            d.counts[i] += 1;
        }
        d.count += 1;
        d.sum += x;
    }

    /// `name_bucket{le=...}`, `name_sum` and `name_count`, with `labels` (`k="v",...`) on each.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let d = lock(&self.data);
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&d.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", d.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", d.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", d.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        for ms in [3, 7, 700] {
            m.observe_time_to_first_token(Duration::from_millis(ms));
        }
        let text = m.render(&EngineStats::default());
        assert!(text.contains("bitnet_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("bitnet_time_to_first_token_seconds_bucket{le=\"0.01\"} 2\n"));
        assert!(text.contains("bitnet_time_to_first_token_seconds_bucket{le=\"0.5\"} 2\n"));
        assert!(text.contains("bitnet_time_to_first_token_seconds_bucket{le=\"1\"} 3\n"));
        assert!(text.contains("bitnet_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("bitnet_time_to_first_token_seconds_count 3\n"));
    }

    #[test]
    fn requests_are_counted_by_endpoint_and_status() {
        let m = Metrics::default();
        m.record_response(Metrics::endpoint_label("/v1/completions"), 200);
        m.record_response(Metrics::endpoint_label("/v1/completions"), 200);
        m.record_response(Metrics::endpoint_label("/nope"), 404);
        let text = m.render(&EngineStats { running: 2, kv_blocks_used: 5, ..Default::default() });
        assert!(text.contains("bitnet_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2\n"));
        assert!(text.contains("bitnet_http_requests_total{endpoint=\"other\",status=\"404\"} 1\n"));
        assert!(text.contains("bitnet_running_sequences 2\n"));
        assert!(text.contains("bitnet_kv_blocks_used 5\n"));
    }
}
