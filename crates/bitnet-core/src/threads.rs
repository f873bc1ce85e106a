//! How many threads a parallel step may use: rayon's pool size, under a cap that belongs to the
//! thread that runs the step.
//!
//! The decode governor (`bitnet_inference::governor`) lowers the cap to one while another process
//! holds a core: every product then runs on the calling thread and no step waits on a helper
//! thread that the scheduler has preempted. The cap is thread-local, not process-wide, so that
//! two contexts decoding on two threads (a server's workers, two Python threads) each follow
//! their own governor.

use std::cell::Cell;

thread_local! {
    static CAP: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Threads a parallel step started from this thread should use now: the current rayon pool's,
/// at most this thread's cap.
pub fn parallel_threads() -> usize {
    rayon::current_num_threads().min(CAP.with(Cell::get)).max(1)
}

/// Sets this thread's cap (`usize::MAX`: none).
pub fn set_parallel_cap(threads: usize) {
    CAP.with(|c| c.set(threads.max(1)));
}

/// Caps parallel steps started from this thread at one until dropped (also when a panic unwinds
/// past it), restoring the cap it found.
pub struct SoloGuard {
    previous: usize,
}

impl SoloGuard {
    pub fn new() -> Self {
        let previous = CAP.with(|c| c.replace(1));
        SoloGuard { previous }
    }
}

impl Default for SoloGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SoloGuard {
    fn drop(&mut self) {
        CAP.with(|c| c.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_per_thread_and_restored() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| {
            assert_eq!(parallel_threads(), 3);
            let guard = SoloGuard::new();
            assert_eq!(parallel_threads(), 1);
            // Another thread is not capped by this one's guard.
            let other = std::thread::scope(|s| s.spawn(|| pool.install(parallel_threads)).join().unwrap());
            assert_eq!(other, 3);
            drop(guard);
            assert_eq!(parallel_threads(), 3);
        });
    }
}
