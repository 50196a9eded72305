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
    handle: Option<JoinHandle<GuestDuringSave>>,
}

impl ProgressMonitor {
    /// Starts sampling `vm`'s progress on a thread of its own. `moving[i]`: vCPU `i` was making
    /// progress before the save (a vCPU that then never moves again stalled for the whole save).
    pub fn start(vm: &Arc<Vm>, moving: Vec<bool>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (vm, stop2) = (vm.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("save-monitor".into())
            .spawn(move || watch(&vm, &moving, &stop2))
            .ok();
        Self { stop, handle }
    }

    /// Stops sampling and returns what was seen.
    pub fn finish(mut self) -> GuestDuringSave {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for ProgressMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn watch(vm: &Vm, moving: &[bool], stop: &AtomicBool) -> GuestDuringSave {
    let t0 = Instant::now();
    let first = vm.progress().steps;
    let mut last = first.clone();
    let mut last_change = vec![t0; first.len()];
    let mut max_stall = Duration::ZERO;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(SAMPLE_EVERY);
        let now = Instant::now();
        let steps = vm.progress().steps;
        for (i, (s, l)) in steps.iter().zip(last.iter_mut()).enumerate() {
            if s != l {
                max_stall = max_stall.max(now.duration_since(last_change[i]));
                last_change[i] = now;
                *l = *s;
            }
        }
    }
    let end = Instant::now();
    // A vCPU that did not move again counts up to the end, if it moved at all during the save or
    // was moving before it (one stuck from the freeze on stalled for the whole save).
    for (i, (s, f)) in last.iter().zip(&first).enumerate() {
        if s != f || moving.get(i).copied().unwrap_or(false) {
            max_stall = max_stall.max(end.duration_since(last_change[i]));
        }
    }
    let done: u64 = last
        .iter()
        .zip(&first)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    GuestDuringSave {
        steps_per_s: done as f64 / end.duration_since(t0).as_secs_f64().max(1e-9),
        max_stall_ms: max_stall.as_secs_f64() * 1e3,
    }
}
