//! The server's settings.

use std::time::Duration;

/// How `serve` listens and what it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address to listen on, e.g. `127.0.0.1` (the default), `0.0.0.0` or `::1`.
    pub host: String,
    /// Port to listen on; 0 picks a free one ([`crate::Server::local_addr`] tells which).
    pub port: u16,
    /// When set, every `/v1/...` request must carry `Authorization: Bearer <key>` (else 401).
    /// `/`, `/health` and `/metrics` stay open.
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes (larger: 413). Default 4 MiB.
    pub max_body_bytes: usize,
    /// How long graceful shutdown lets in-flight requests run before the engine cancels them.
    /// Default 30 s.
    pub shutdown_grace: Duration,
    /// `max_tokens` of a request that gives none; `None` (the default): whatever the context leaves
    /// after the prompt. Never more than that.
    pub default_max_tokens: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".to_string(),
            port: 8080,
            api_key: None,
            max_body_bytes: 4 << 20,
            shutdown_grace: Duration::from_secs(30),
            default_max_tokens: None,
        }
    }
}
