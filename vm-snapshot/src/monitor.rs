//! Watches guest progress while a save runs: how fast the guest still writes, and its worst stall.
//!
//! A stall is the longest interval during which some vCPU that was making progress before the freeze did
//! not complete a single step (a vCPU blocked on a write-protected page shows up exactly like that).

use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_core::Vm;

/// How often guest progress is sampled during a save.
const SAMPLE_EVERY: Duration = Duration::from_micros(500);

/// What the monitor saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestDuringSave {
    /// Guest steps per second (all vCPUs) during the save.
    pub steps_per_s: f64,
    /// Longest time any vCPU made no step, in milliseconds.
    pub max_stall_ms: f64,
}

/// A running monitor; `finish` stops it and returns the figures.
#[derive(Debug)]
pub struct ProgressMonitor {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Sample>>>,
    moving: Vec<bool>,
}

/// Each vCPU's step count at an instant.
type Sample = (Instant, Vec<u64>);

impl ProgressMonitor {
    /// Starts sampling `vm`'s progress on a thread of its own. `moving[i]`: vCPU `i` was making
    /// progress before the save (a vCPU that then never moves again stalled for the whole save).
    pub fn start(vm: &Arc<Vm>, moving: Vec<bool>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (vm, stop2) = (vm.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("save-monitor".into())
            .spawn(move || watch(&vm, &stop2))
            .ok();
        Self {
            stop,
            handle,
            moving,
        }
    }

    /// Stops sampling and returns what was seen from `from` (the freeze's start: whatever the
    /// save did before it, such as preparing staging, is not the guest's save) to now.
    pub fn finish(mut self, from: Instant) -> GuestDuringSave {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self
            .handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        figures(&samples, from, &self.moving)
    }
}

impl Drop for ProgressMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Samples every [`SAMPLE_EVERY`] until stopped, the first at once and the last at the stop.
fn watch(vm: &Vm, stop: &AtomicBool) -> Vec<Sample> {
    let mut samples = vec![(Instant::now(), vm.progress().steps)];
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(SAMPLE_EVERY);
        samples.push((Instant::now(), vm.progress().steps));
    }
    samples.push((Instant::now(), vm.progress().steps));
    samples
}

/// Rate and longest stall over the samples from the last one taken at or before `from` on.
fn figures(samples: &[Sample], from: Instant, moving: &[bool]) -> GuestDuringSave {
    let base = samples.iter().rposition(|(t, _)| *t <= from).unwrap_or(0);
    let Some(((t0, first), rest)) = samples[base..].split_first() else {
        return GuestDuringSave::default();
    };
    let mut last = first.clone();
    let mut last_change = vec![*t0; first.len()];
    let mut max_stall = Duration::ZERO;
    let mut end = *t0;
    for (now, steps) in rest {
        end = *now;
        for (i, (s, l)) in steps.iter().zip(last.iter_mut()).enumerate() {
            if s != l {
                max_stall = max_stall.max(now.duration_since(last_change[i]));
                last_change[i] = *now;
                *l = *s;
            }
        }
    }
    // A vCPU that did not move again counts up to the end, if it moved at all during the save or
    // was moving before it (one stuck from the freeze on stalled for the whole save).
    for (i, (s, f)) in last.iter().zip(first).enumerate() {
        if s != f || moving.get(i).copied().unwrap_or(false) {
            max_stall = max_stall.max(end.duration_since(last_change[i]));
        }
    }
    let done: u64 = last
        .iter()
        .zip(first)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    GuestDuringSave {
        steps_per_s: done as f64 / end.duration_since(*t0).as_secs_f64().max(1e-9),
        max_stall_ms: max_stall.as_secs_f64() * 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64, steps: &[u64]) -> Sample {
        (t0 + Duration::from_millis(ms), steps.to_vec())
    }

    #[test]
    fn figures_count_from_the_freeze_on() {
        let t0 = Instant::now();
        // Fast before the freeze at 100 ms (what preparing staging overlaps), slow after, and
        // vCPU 1 stuck from 120 ms to the end at 300 ms.
        let samples = vec![
            at(t0, 0, &[0, 0]),
            at(t0, 50, &[5000, 5000]),
            at(t0, 100, &[10000, 10000]),
            at(t0, 120, &[10100, 10100]),
            at(t0, 200, &[10500, 10100]),
            at(t0, 300, &[11000, 10100]),
        ];
        let g = figures(&samples, t0 + Duration::from_millis(110), &[true, true]);
        // From the 100 ms sample: 1000 + 100 steps in 200 ms.
        assert!((g.steps_per_s - 5500.0).abs() < 1.0, "{g:?}");
        assert!((g.max_stall_ms - 180.0).abs() < 0.5, "{g:?}");
        // From the start: the fast part counts too.
        let all = figures(&samples, t0, &[true, true]);
        assert!(all.steps_per_s > 60000.0, "{all:?}");
        assert_eq!(figures(&[], t0, &[]).steps_per_s, 0.0);
    }
}
