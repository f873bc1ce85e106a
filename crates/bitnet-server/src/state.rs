//! What every handler shares.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::ServerConfig;
use crate::engine::Engine;
use crate::metrics::Metrics;

/// The server's shared state, cheap to clone.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

pub(crate) struct Shared {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) cfg: ServerConfig,
    pub(crate) metrics: Metrics,
    /// The engine's model name, read once.
    pub(crate) model_id: String,
    /// When the server started, in Unix seconds (`created` of `/v1/models`).
    pub(crate) started_unix: u64,
    /// Set when graceful shutdown begins: new generations get 503, `/health` says so.
    pub(crate) shutting_down: AtomicBool,
    next_id: AtomicU64,
}

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub(crate) fn new(engine: Arc<dyn Engine>, cfg: ServerConfig) -> Self {
        let model_id = engine.model_id();
        AppState(Arc::new(Shared {
            engine,
            cfg,
            metrics: Metrics::default(),
            model_id,
            started_unix: unix_now(),
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
        }))
    }

    /// A response id unique within this server's life and unlikely to repeat across restarts:
    /// the start time and a counter.
    pub(crate) fn next_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:08x}", self.started_unix)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
