//! What Ctrl-C (and SIGTERM, SIGHUP) means depends on what the process is doing. `main`
//! installs the one signal handler; it asks [`on_signal`] first:
//! - while a reply streams (`generate`, a `chat` turn), the signal stops that reply: the
//!   generation callback sees [`take`] and breaks, and the process goes on (a chat waits for
//!   the next message; `generate` prints what it has and exits 130);
//! - while `serve` runs, the server's own listener shuts it down gracefully;
//! - otherwise `main`'s handler goes on (training saves a checkpoint, anything else removes its
//!   temporary files and exits 130).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static MODE: AtomicU8 = AtomicU8::new(Mode::Other as u8);

/// The exit status of a run cut short by a signal, as shells report SIGINT's.
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Other = 0,
    Streaming = 1,
    Serving = 2,
}

/// Sets what a signal means from now on.
pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::SeqCst);
}

/// Called by the signal handler: true when the signal has been dealt with here (a reply was
/// told to stop, or the server handles it), false when the handler should go on.
pub fn on_signal() -> bool {
    match MODE.load(Ordering::SeqCst) {
        m if m == Mode::Streaming as u8 => {
            INTERRUPTED.store(true, Ordering::SeqCst);
            true
        }
        m if m == Mode::Serving as u8 => true,
        _ => false,
    }
}

/// Whether a signal came since the last call, clearing it.
pub fn take() -> bool {
    INTERRUPTED.swap(false, Ordering::SeqCst)
}
