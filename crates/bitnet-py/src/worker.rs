//! Long engine work on a thread of its own, so that the calling Python thread can wait detached
//! from the interpreter (other Python threads run) and still notice Ctrl-C.
//!
//! Python runs signal handlers only on its main thread, and only when that thread checks for
//! them. A thread blocked inside the engine never does, so the caller waits in short slices and
//! calls `check_signals` between them; a `KeyboardInterrupt` raises the work's stop flag, waits
//! for the work to wind down cleanly (a generation stops at its next token, training saves a
//! checkpoint after its current step), and is then raised.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::prelude::*;

use crate::errors::engine_error;

/// How long a waiting Python thread stays detached before it checks for signals.
pub const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Asks running work to stop; shared between the waiting Python thread and the worker.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn raise(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Starts a thread named `bitnet-<name>`.
pub fn spawn<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> PyResult<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(format!("bitnet-{name}"))
        .spawn(work)
        .map_err(|e| engine_error(format!("cannot start a thread: {e}")))
}

/// The message of a panic payload.
pub fn panic_message(payload: Box<dyn Any + Send>) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string());
    format!("the engine panicked: {what}")
}

/// Runs `work` on a thread of its own while this thread waits detached from Python, checking
/// for signals every [`SIGNAL_POLL`]. On `KeyboardInterrupt` (or any error a signal handler
/// raises) the stop flag goes up, the work is awaited, and the error is raised.
pub fn run_interruptible<T: Send + 'static>(
    py: Python<'_>,
    name: &str,
    work: impl FnOnce(StopFlag) -> T + Send + 'static,
) -> PyResult<T> {
    let stop = StopFlag::default();
    let (tx, rx) = sync_channel(1);
    let worker_stop = stop.clone();
    let handle = spawn(name, move || {
        let _ = tx.send(work(worker_stop));
    })?;
    let rx = Mutex::new(rx);
    let mut interrupted: Option<PyErr> = None;
    loop {
        match py.detach(|| recv_slice(&rx)) {
            Ok(out) => {
                let _ = py.detach(|| handle.join());
                return match interrupted {
                    Some(e) => Err(e),
                    None => Ok(out),
                };
            }
            Err(RecvTimeoutError::Timeout) => {
                if interrupted.is_none() {
                    if let Err(e) = py.check_signals() {
                        stop.raise();
                        interrupted = Some(e);
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let why = match py.detach(|| handle.join()) {
                    Err(payload) => panic_message(payload),
                    Ok(()) => "the worker thread ended without a result".to_string(),
                };
                return Err(engine_error(why));
            }
        }
    }
}

/// Waits up to [`SIGNAL_POLL`] for a message.
pub fn recv_slice<T>(rx: &Mutex<Receiver<T>>) -> Result<T, RecvTimeoutError> {
    rx.lock().unwrap_or_else(PoisonError::into_inner).recv_timeout(SIGNAL_POLL)
}
