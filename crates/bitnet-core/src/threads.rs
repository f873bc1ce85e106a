//! How many threads a parallel step may use: rayon's pool size, under a process-wide cap that
//! the decode governor (`bitnet_inference::governor`) lowers to one while another process
//! holds a core. With the cap at one, every product runs on the calling thread and no step
//! waits on a helper thread that the scheduler has preempted.

use std::sync::atomic::{AtomicUsize, Ordering};

static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Threads a parallel step should use now: the current rayon pool's, at most the cap.
pub fn parallel_threads() -> usize {
    rayon::current_num_threads().min(CAP.load(Ordering::Relaxed)).max(1)
}

/// Sets the cap (`usize::MAX`: none). Process-wide: concurrent decoders share it.
pub fn set_parallel_cap(threads: usize) {
    CAP.store(threads.max(1), Ordering::Relaxed);
}

/// Caps parallel steps at one thread until dropped (also when a panic unwinds past it).
pub struct SoloGuard(());

impl SoloGuard {
    pub fn new() -> Self {
        set_parallel_cap(1);
        SoloGuard(())
    }
}

impl Default for SoloGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SoloGuard {
    fn drop(&mut self) {
        set_parallel_cap(usize::MAX);
    }
}
