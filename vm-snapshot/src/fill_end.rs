//! What a fill on demand shares between lazy restore ([`LazyRestore`](crate::LazyRestore)) and a
//! migration's destination ([`Incoming`](crate::migrate::Incoming)): the fault-wait samples and
//! their percentiles, the collapse into huge pages after every page is resident, the
//! [`CollapseHold`]s that keep it waiting (a save), and the wait for the fill's end.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most fault waits kept for the percentiles (later ones still count in the maximum).
const MAX_WAIT_SAMPLES: usize = 1 << 17;

/// Fault waits (a fault read → its page filled) in µs.
#[derive(Debug, Default)]
pub(crate) struct WaitSamples {
    samples: Vec<u32>,
    /// The longest wait, µs.
    pub(crate) max: u64,
}

impl WaitSamples {
    /// Counts one wait.
    pub(crate) fn add(&mut self, wait: Duration) {
        let us = wait.as_micros().min(u128::from(u32::MAX)) as u32;
        self.max = self.max.max(u64::from(us));
        if self.samples.len() < MAX_WAIT_SAMPLES {
            self.samples.push(us);
        }
    }

    /// The p50 and p99 of the kept waits, µs (0 without any).
    pub(crate) fn p50_p99(&self) -> (u64, u64) {
        let mut v = self.samples.clone();
        v.sort_unstable();
        let pct = |p: usize| {
            v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
                .copied()
                .map_or(0, u64::from)
        };
        (pct(50), pct(99))
    }
}

/// Who holds the collapse off, and the collapse call in flight.
#[derive(Debug, Default)]
pub(crate) struct CollapseGate {
    /// Holders of [`CollapseHold`]s: the collapse waits while there are any.
    holds: AtomicUsize,
    /// Held during each collapse call.
    collapsing: Mutex<()>,
}

impl CollapseGate {
    /// Holds the collapse off until the returned guard is dropped; waits for a collapse call in
    /// flight to end.
    pub(crate) fn hold(self: &Arc<Self>) -> CollapseHold {
        self.holds.fetch_add(1, Ordering::SeqCst);
        drop(lock(&self.collapsing));
        CollapseHold { gate: self.clone() }
    }

    /// The right to make one collapse call: waits while a [`CollapseHold`] lives; `None` once
    /// `quit` is set (the owner lets go).
    pub(crate) fn turn(&self, quit: &AtomicBool) -> Option<MutexGuard<'_, ()>> {
        loop {
            while self.holds.load(Ordering::SeqCst) > 0 {
                if quit.load(Ordering::SeqCst) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if quit.load(Ordering::SeqCst) {
                return None;
            }
            let g = lock(&self.collapsing);
            if self.holds.load(Ordering::SeqCst) == 0 {
                return Some(g);
            }
        }
    }
}

/// Keeps the collapse into huge pages waiting while it lives
/// ([`LazyRestore::hold_collapse`](crate::LazyRestore::hold_collapse),
/// [`Incoming::hold_collapse`](crate::migrate::Incoming::hold_collapse)).
#[derive(Debug)]
pub struct CollapseHold {
    gate: Arc<CollapseGate>,
}

impl Drop for CollapseHold {
    fn drop(&mut self) {
        self.gate.holds.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits up to `timeout` on `end` (notified through `cv`) until `failed` names a failure
/// (`Some(Err)`) or `reached` holds (`Some(Ok)`); `None` when the time is up first.
pub(crate) fn wait_end<E, F: Clone>(
    end: &Mutex<E>,
    cv: &Condvar,
    timeout: Duration,
    failed: impl Fn(&E) -> Option<&F>,
    reached: impl Fn(&E) -> bool,
) -> Option<Result<(), F>> {
    let deadline = Instant::now() + timeout;
    let mut end = lock(end);
    loop {
        if let Some(f) = failed(&end) {
            return Some(Err(f.clone()));
        }
        if reached(&end) {
            return Some(Ok(()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        end = cv
            .wait_timeout(end, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_percentiles_come_from_the_kept_samples_and_the_max_from_all() {
        let mut w = WaitSamples::default();
        assert_eq!(w.p50_p99(), (0, 0));
        for us in (1..=100).rev() {
            w.add(Duration::from_micros(us));
        }
        assert_eq!(w.p50_p99(), (51, 100));
        assert_eq!(w.max, 100);
        for _ in 0..MAX_WAIT_SAMPLES {
            w.add(Duration::from_micros(1));
        }
        w.add(Duration::from_secs(7));
        assert_eq!(w.samples.len(), MAX_WAIT_SAMPLES);
        assert_eq!(w.max, 7_000_000);
        assert_eq!(w.p50_p99(), (1, 1));
    }

    #[test]
    fn a_hold_keeps_the_collapse_turn_until_dropped_or_quit() {
        let gate = Arc::new(CollapseGate::default());
        let quit = AtomicBool::new(false);
        assert!(gate.turn(&quit).is_some());
        let hold = gate.hold();
        quit.store(true, Ordering::SeqCst);
        assert!(gate.turn(&quit).is_none());
        quit.store(false, Ordering::SeqCst);
        drop(hold);
        assert!(gate.turn(&quit).is_some());
    }
}
