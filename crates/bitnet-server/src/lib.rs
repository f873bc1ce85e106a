//! The HTTP layer of `bitnet serve`: an OpenAI-compatible API (`/v1/models`,
//! `/v1/completions`, `/v1/chat/completions`, streaming or not), `/health`, Prometheus
//! `/metrics` and a chat page at `/`, over any token generator that implements [`Engine`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use bitnet_server::{Engine, ServerError};
//! # async fn run(engine: Arc<dyn Engine>) -> Result<(), ServerError> {
//! let cfg = bitnet_server::ServerConfig { port: 0, ..Default::default() };
//! let server = bitnet_server::Server::bind(&cfg).await?;
//! println!("listening on http://{}", server.local_addr());
//! server.run(engine, cfg, async { tokio::signal::ctrl_c().await.ok(); }).await
//! # }
//! ```
//!
//! `docs/serving.md` describes the endpoints, parameters, errors and metrics.

pub mod config;
pub mod engine;
pub mod error;
mod handlers;
mod metrics;
pub mod mock;
pub mod request;
mod response;
mod state;
mod stream;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

pub use config::ServerConfig;
pub use engine::{
    ChatTurn, Engine, EngineError, EngineStats, FinishReason, GenerationEvent, GenerationRequest,
    SubmitError, TokenLogprob, TopLogprob,
};
pub use error::{ApiError, ServerError};

use state::AppState;

/// How long, after the engine was told to shut down, the server waits for the cancelled
/// responses to end before dropping their connections.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// The whole application: routes, authentication, metrics and panic catching, without a socket.
/// Tests drive it with `tower::ServiceExt::oneshot`.
pub fn router(engine: Arc<dyn Engine>, cfg: ServerConfig) -> axum::Router {
    app(AppState::new(engine, cfg))
}

fn app(state: AppState) -> axum::Router {
    use axum::routing::post;
    axum::Router::new()
        .route("/", get(handlers::chat_page))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{id}", get(handlers::get_model))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/embeddings", post(handlers::embeddings))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        // Layers run outside in: the last added sees the request first.
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(state.clone(), count_response))
        .with_state(state)
}

/// 401 for a `/v1/...` request without the configured key.
async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = &state.cfg.api_key else { return next.run(req).await };
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = given.and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    match token {
        Some(t) if constant_time_eq(t.as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::with_status(StatusCode::UNAUTHORIZED, "incorrect API key provided")
            .code("invalid_api_key")
            .into_response(),
        None => ApiError::with_status(
            StatusCode::UNAUTHORIZED,
            "missing API key: send it as 'Authorization: Bearer <key>'",
        )
        .code("invalid_api_key")
        .into_response(),
    }
}

/// Compares keys in time independent of where they differ, so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every response by endpoint and status, panics and auth failures included.
async fn count_response(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = metrics::Metrics::endpoint_label(req.uri().path());
    let response = next.run(req).await;
    state.metrics.record_response(endpoint, response.status().as_u16());
    response
}

/// A panicking handler answers 500 in the usual error shape; the server goes on.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message");
    ApiError::with_status(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error: the handler panicked ({detail})"),
    )
    .code("internal_error")
    .into_response()
}

/// A bound listening socket, before serving: lets the caller learn the address (port 0) first.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl Server {
    /// Binds `cfg.host:cfg.port`.
    pub async fn bind(cfg: &ServerConfig) -> Result<Server, ServerError> {
        if cfg.max_body_bytes == 0 {
            return Err(ServerError::Config("max_body_bytes must be at least 1".into()));
        }
        if cfg.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err(ServerError::Config("the API key is empty".into()));
        }
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let bind_error = |source| ServerError::Bind { addr: addr.clone(), source };
        let listener = TcpListener::bind((cfg.host.as_str(), cfg.port)).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        Ok(Server { listener, local_addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then shuts down gracefully: stops accepting, lets
    /// in-flight requests finish for up to `cfg.shutdown_grace`, then calls
    /// [`Engine::shutdown`] (which ends whatever still runs) and returns.
    pub async fn run(
        self,
        engine: Arc<dyn Engine>,
        cfg: ServerConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let grace = cfg.shutdown_grace;
        let state = AppState::new(engine.clone(), cfg);
        let started = Arc::new(tokio::sync::Notify::new());
        let signal = {
            let (state, started) = (state.clone(), started.clone());
            async move {
                shutdown.await;
                state.begin_shutdown();
                started.notify_one();
            }
        };
        // Token chunks are small writes: send each at once rather than waiting for Nagle.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, app(state)).with_graceful_shutdown(signal).into_future();
        tokio::pin!(server);
        let drained = tokio::select! {
            result = &mut server => Some(result),
            _ = async { started.notified().await; tokio::time::sleep(grace).await } => None,
        };
        engine.shutdown();
        match drained {
            Some(result) => Ok(result?),
            None => {
                // The engine closed the remaining streams; give their last bytes a moment, then
                // drop whatever connections are left.
                match tokio::time::timeout(CANCEL_WAIT, &mut server).await {
                    Ok(result) => Ok(result?),
                    Err(_) => Ok(()),
                }
            }
        }
    }
}

/// Binds `cfg.host:cfg.port` and serves `engine` until `shutdown` completes (see
/// [`Server::run`]). Use [`Server::bind`] + [`Server::run`] to learn the bound address first.
pub async fn serve(
    engine: Arc<dyn Engine>,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::bind(&cfg).await?.run(engine, cfg, shutdown).await
}

/// Completes at Ctrl-C or (on Unix) SIGTERM: the `shutdown` future a binary usually passes to
/// [`Server::run`].
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
