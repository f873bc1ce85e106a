//! Wall time per layer function of a training step, for finding where a step goes on a given
//! machine. Off unless `BITNET_TRAIN_PROFILE` is set (then each section costs two clock reads);
//! `examples/bench_step.rs` prints the table.
//!
//! Times are inclusive: a section that calls another (a BitLinear backward and its products)
//! counts the inner one's time too.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("BITNET_TRAIN_PROFILE").is_some_and(|v| !v.is_empty() && v != "0"))
}

/// Name, total time, calls; in order of first use.
static TOTALS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

/// Times from its creation to its drop under `name` (when profiling is on).
pub struct Section {
    name: &'static str,
    start: Option<Instant>,
}

/// Starts timing `name`; the time is recorded when the returned guard drops.
#[must_use]
pub fn section(name: &'static str) -> Section {
    Section { name, start: enabled().then(Instant::now) }
}

impl Drop for Section {
    fn drop(&mut self) {
        let Some(start) = self.start else { return };
        let elapsed = start.elapsed();
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        match totals.iter_mut().find(|(n, _, _)| *n == self.name) {
            Some(entry) => {
                entry.1 += elapsed;
                entry.2 += 1;
            }
            None => totals.push((self.name, elapsed, 1)),
        }
    }
}

/// The totals so far (`name`, seconds, calls), and clears them. Empty when profiling is off.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    totals.drain(..).map(|(n, d, c)| (n, d.as_secs_f64(), c)).collect()
}
