//! Decoding beside a busy process.
//!
//! A decoded token runs about 125 parallel products, and each one ends when its slowest
//! thread does. When another process holds one of the cores, one of our threads is
//! preempted at random points and every product waits for it: on the 2-core dev machine, two
//! threads beside `yes` decoded 14 tokens/s, against 20 for one thread alone on the free core
//! and 35 for two on a quiet machine.
//!
//! The governor picks, every few decode steps, between all of the pool's threads (`Full`) and
//! the calling thread alone (`Solo`, through [`bitnet_core::threads::set_parallel_cap`]). It
//! times steps in epochs of [`EPOCH`] tokens and tries the other mode for one epoch
//! * at once, in `Full`, when an epoch is [`SLOWDOWN`] times slower than the fastest `Full`
//!   epoch seen (something else took CPU time), and
//! * every `explore_every` epochs otherwise (16, doubling up to [`MAX_EXPLORE_EVERY`] while
//!   the other mode keeps losing), so that it returns to `Full` within 256 tokens of the load
//!   going away; on a quiet machine the trials cost about 1.5 % of the tokens.
//!
//! It keeps the other mode when that epoch was at least [`MARGIN`] faster. Results do not
//! depend on the mode: every kernel gives the same values on one thread as on several.
//! A context built with `ContextOptions::governor` off keeps `Full` always (the CLI's
//! `BITNET_DECODE_GOVERNOR=off`).

use std::time::Duration;

/// Decode steps per measured epoch.
pub const EPOCH: u32 = 4;
/// A `Full` epoch this much slower than the best one suggests contention.
const SLOWDOWN: f64 = 1.3;
/// The other mode must beat the current one by this factor to be kept.
const MARGIN: f64 = 0.9;
/// Epochs between trials of the other mode, at first and at most.
const FIRST_EXPLORE_EVERY: u32 = 16;
const MAX_EXPLORE_EVERY: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Full,
    Solo,
}

impl Mode {
    fn other(self) -> Mode {
        match self {
            Mode::Full => Mode::Solo,
            Mode::Solo => Mode::Full,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DecodeGovernor {
    /// The mode the coming steps run in.
    mode: Mode,
    /// The mode to return to if a trial of `mode` loses; `None` outside a trial.
    trial_of: Option<Mode>,
    steps: u32,
    elapsed: Duration,
    /// Seconds per token of the last epoch of each mode (`[Full, Solo]`).
    last: [Option<f64>; 2],
    best_full: f64,
    epochs_since_trial: u32,
    explore_every: u32,
}

impl Default for DecodeGovernor {
    fn default() -> Self {
        Self {
            mode: Mode::Full,
            trial_of: None,
            steps: 0,
            elapsed: Duration::ZERO,
            last: [None, None],
            best_full: f64::INFINITY,
            epochs_since_trial: 0,
            explore_every: FIRST_EXPLORE_EVERY,
        }
    }
}

fn slot(m: Mode) -> usize {
    match m {
        Mode::Full => 0,
        Mode::Solo => 1,
    }
}

impl DecodeGovernor {
    /// The mode the next step should run in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Records one decode step's wall time and, at the end of an epoch, picks the next mode.
    pub fn record(&mut self, step: Duration) {
        self.steps += 1;
        self.elapsed += step;
        if self.steps < EPOCH {
            return;
        }
        let per_token = self.elapsed.as_secs_f64() / self.steps as f64;
        (self.steps, self.elapsed) = (0, Duration::ZERO);
        self.end_epoch(per_token);
    }

    fn end_epoch(&mut self, per_token: f64) {
        let mode = self.mode;
        self.last[slot(mode)] = Some(per_token);
        if mode == Mode::Full {
            self.best_full = self.best_full.min(per_token);
        }
        if let Some(previous) = self.trial_of.take() {
            let won = self.last[slot(previous)].is_none_or(|p| per_token < p * MARGIN);
            if won {
                self.explore_every = FIRST_EXPLORE_EVERY;
            } else {
                self.mode = previous;
                self.explore_every = (self.explore_every * 2).min(MAX_EXPLORE_EVERY);
            }
            self.epochs_since_trial = 0;
            return;
        }
        self.epochs_since_trial += 1;
        let contended = mode == Mode::Full && per_token > SLOWDOWN * self.best_full;
        if contended || self.epochs_since_trial >= self.explore_every {
            self.trial_of = Some(mode);
            self.mode = mode.other();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds epochs whose per-token time depends on the mode; returns the modes run.
    fn run(g: &mut DecodeGovernor, epochs: usize, cost: impl Fn(Mode) -> f64) -> Vec<Mode> {
        (0..epochs)
            .map(|_| {
                let m = g.mode();
                for _ in 0..EPOCH {
                    g.record(Duration::from_secs_f64(cost(m)));
                }
                m
            })
            .collect()
    }

    #[test]
    fn a_quiet_machine_stays_on_all_threads_but_for_rare_trials() {
        let mut g = DecodeGovernor::default();
        let modes = run(&mut g, 1000, |m| if m == Mode::Full { 0.028 } else { 0.050 });
        let solo = modes.iter().filter(|&&m| m == Mode::Solo).count();
        // Trials after 16, 32, 64, 64, … epochs: about 16 in 1000, 1.6 % of the tokens.
        assert!(solo <= 20, "{solo} solo epochs of 1000");
        assert_eq!(modes[..16], [Mode::Full; 16]);
    }

    #[test]
    fn contention_moves_to_one_thread_and_back_when_it_ends() {
        let mut g = DecodeGovernor::default();
        run(&mut g, 20, |m| if m == Mode::Full { 0.028 } else { 0.050 });
        // A busy process arrives: two threads slow to 70 ms, one stays at 50.
        let busy = run(&mut g, 200, |m| if m == Mode::Full { 0.070 } else { 0.050 });
        let solo = busy.iter().filter(|&&m| m == Mode::Solo).count();
        assert!(solo >= 180, "only {solo} of 200 epochs on one thread under load");
        // It leaves.
        let quiet = run(&mut g, 200, |m| if m == Mode::Full { 0.028 } else { 0.050 });
        let solo = quiet[100..].iter().filter(|&&m| m == Mode::Solo).count();
        assert!(solo <= 3, "{solo} of the last 100 quiet epochs on one thread");
    }
}
