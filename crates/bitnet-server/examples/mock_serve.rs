//! The server on the mock engine, for the Python client test, the browser check and the load
//! tool: `cargo run -p bitnet-server --example mock_serve -- --port 8080`.
//!
//! Options: `--host H` (127.0.0.1), `--port P` (8080; 0 picks one), `--api-key K`,
//! `--max-body-bytes N`, `--token-delay-ms MS` (2), `--context-len N` (2048), `--max-running N`
//! (8), `--max-queued N` (64), `--shutdown-grace-ms MS` (30000). Prints
//! `listening on http://ADDR` once bound; Ctrl-C or SIGTERM shuts it down gracefully.

use std::sync::Arc;
use std::time::Duration;

use bitnet_server::mock::{MockConfig, MockEngine};
use bitnet_server::{Server, ServerConfig};

fn main() {
    if let Err(e) = run() {
        eprintln!("mock_serve: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut cfg = ServerConfig::default();
    let mut mock = MockConfig { context_len: 2048, ..Default::default() };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: '{v}' is not a number: {e}"));
        match flag.as_str() {
            "--host" => cfg.host = value()?,
            "--port" => {
                cfg.port = number(value()?)?.try_into().map_err(|_| "--port: over 65535".to_string())?
            }
            "--api-key" => cfg.api_key = Some(value()?),
            "--max-body-bytes" => cfg.max_body_bytes = number(value()?)? as usize,
            "--shutdown-grace-ms" => cfg.shutdown_grace = Duration::from_millis(number(value()?)?),
            "--token-delay-ms" => mock.token_delay = Duration::from_millis(number(value()?)?),
            "--context-len" => mock.context_len = number(value()?)? as usize,
            "--max-running" => mock.max_running = number(value()?)? as usize,
            "--max-queued" => mock.max_queued = number(value()?)? as usize,
            "-h" | "--help" => {
                println!(
                    "{}",
                    include_str!("mock_serve.rs")
                        .lines()
                        .take(8)
                        .map(|l| l.trim_start_matches("//! "))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                return Ok(());
            }
            other => return Err(format!("unknown option '{other}' (see --help)")),
        }
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        let server = Server::bind(&cfg).await.map_err(|e| e.to_string())?;
        println!("listening on http://{} (mock engine, pid {})", server.local_addr(), std::process::id());
        let engine = Arc::new(MockEngine::new(mock));
        server.run(engine, cfg, bitnet_server::shutdown_signal()).await.map_err(|e| e.to_string())?;
        println!("shut down");
        Ok(())
    })
}
