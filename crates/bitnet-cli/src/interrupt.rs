//! Ctrl-C and SIGTERM for the commands that stream: the first signal during a reply stops that
//! reply (the generation callback sees the flag and breaks); a signal while nothing is being
//! generated (a chat waiting for input) exits with status 130, as an interrupted program does.
//! The handler is installed once per process, on first use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static BUSY: AtomicBool = AtomicBool::new(true);
static INSTALL: Once = Once::new();

/// The exit status of a run cut short by a signal, as shells report SIGINT's.
pub const EXIT_INTERRUPTED: i32 = 130;

fn on_signal() {
    if BUSY.load(Ordering::SeqCst) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    } else {
        std::process::exit(EXIT_INTERRUPTED);
    }
}

/// The flag a signal sets, with the handler installed.
pub fn flag() -> &'static AtomicBool {
    INSTALL.call_once(|| {
        // Without a handler (another one is installed) Ctrl-C keeps its default: exit.
        let _ = ctrlc::set_handler(on_signal);
    });
    &INTERRUPTED
}

/// Whether a signal came since the last call, clearing it.
pub fn take() -> bool {
    flag().swap(false, Ordering::SeqCst)
}

/// Marks whether work is under way: while not, a signal exits the process.
pub fn set_busy(busy: bool) {
    flag();
    BUSY.store(busy, Ordering::SeqCst);
}
