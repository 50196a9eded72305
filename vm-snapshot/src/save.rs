//! A live save of a running VM: open the output, freeze (pause, capture, write-protect, resume),
//! then let ram-saver stream guest RAM out while the guest runs.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ram_saver::{
    AtomicFileSink, Compression, FaultPhases, SaveOptions, SaveProgress, SaveSummary,
    SnapshotHeader, SnapshotSink, StagingFigures, StreamSink,
};
use serde::{Deserialize, Serialize};
use vmm_core::{FreezeError, FreezeTimes, MachineState, Vm};
use wp_tracker::{
    Armed, DirtyError, DirtySet, DirtyTracker, SealStats, WpError, WpTracker, ARM_UNIT,
};

use crate::chain;
use crate::monitor::ProgressMonitor;
use crate::params::{PrepareStaging, SaveParams};
use crate::tracking::WriteRecord;

/// How long a save waits for the reader of a stream target to open it.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many passes protect again, before the freeze, the units the guest wrote while
/// armed.
const CONVERGE_PASSES: usize = 3;
/// No such pass once the guest wrote at most this many units while armed (each costs the freeze
/// a few µs to protect again on huge pages, some 40 µs on 4 KiB pages).
const CONVERGED_UNITS: usize = 8;

/// Why a save failed. Whatever the error, the guest runs on with nothing write-protected, and no
/// file appears under the target's name.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The parameters are unusable (a client's mistake).
    #[error("{0}")]
    Params(String),
    /// The output could not be opened; the guest was not touched.
    #[error("{what}{}", io_hint(source))]
    Target {
        /// What was being done, with the path.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The output is unusable for another reason (e.g. the target exists); the guest was not
    /// touched.
    #[error("{0}")]
    TargetRefused(String),
    /// Write-protecting guest RAM before the freeze failed; the guest runs on unprotected.
    #[error("write-protecting guest RAM before the freeze")]
    Arm(#[source] WpError),
    /// The freeze failed; the guest runs on.
    #[error("freezing the VM")]
    Freeze(#[source] FreezeError<WpError>),
    /// The freeze of a VM whose writes are tracked failed; the guest runs on unprotected and
    /// the record of its writes is lost (the next `parent` save saves all memory).
    #[error("freezing the VM")]
    TrackedFreeze(#[source] FreezeError<DirtyError>),
    /// The save was cancelled.
    #[error("cancelled; no file was written")]
    Cancelled,
    /// The live save failed (`hint` says what to do about a common I/O failure).
    #[error("{}{hint}", chain(.source))]
    Save {
        /// What ram-saver reported.
        source: ram_saver::SaveError,
        /// A plain-words hint, or empty.
        hint: &'static str,
    },
}

/// Phase times of the freeze, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct FreezeMs {
    /// Write-protecting all guest RAM before the freeze, while the guest still runs (not part
    /// of the downtime); with write tracking, protecting again what was written since the last
    /// save.
    #[serde(default)]
    pub arm: f64,
    /// Parking every vCPU.
    pub pause: f64,
    /// Capturing the machine state.
    pub capture: f64,
    /// Write-protecting again what the guest wrote since the arming.
    pub protect: f64,
    /// Letting the vCPUs run again.
    pub resume: f64,
    /// The longest a vCPU was held out of guest execution (parked until running again): the
    /// downtime as the guest sees it.
    #[serde(default)]
    pub guest_held: f64,
}

impl FreezeMs {
    fn new(arm: Duration, t: FreezeTimes) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        FreezeMs {
            arm: ms(arm),
            pause: ms(t.pause),
            capture: ms(t.capture),
            protect: ms(t.hold),
            resume: ms(t.resume),
            guest_held: ms(t.guest_held),
        }
    }
}

/// What a save did (the control protocol's save summary).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SaveReport {
    /// The target path.
    pub path: String,
    /// Guest RAM in bytes.
    pub guest_bytes: u64,
    /// Wall time from the freeze to the committed file, seconds.
    pub duration_s: f64,
    /// How long the vCPUs were held at the freeze, milliseconds.
    pub downtime_ms: f64,
    /// The freeze's phases.
    pub freeze_ms: FreezeMs,
    /// The VM was paused by a client and stays paused.
    pub stayed_paused: bool,
    /// Pages saved (all guest pages).
    pub pages_saved: u64,
    /// Pages stored as zero runs.
    pub zero_pages: u64,
    /// Pages stored as data.
    pub data_pages: u64,
    /// Write faults served ahead of the scan.
    pub faults_served: u64,
    /// Fault service latency, median, µs.
    pub fault_latency_p50_us: u64,
    /// Fault service latency, 99th percentile, µs.
    pub fault_latency_p99_us: u64,
    /// Fault service latency, maximum, µs.
    pub fault_latency_max_us: u64,
    /// Fault service latency summed over every fault, milliseconds.
    #[serde(default)]
    pub fault_wait_total_ms: f64,
    /// Where the fault thread's time went (µs summed over the save, per phase).
    #[serde(default)]
    pub fault_phases_us: FaultPhases,
    /// Staging memory: cap, peak, whether faults reached the cap and how long they waited.
    #[serde(default)]
    pub staging: StagingFigures,
    /// Size of the snapshot.
    pub file_bytes: u64,
    /// File bytes / non-zero guest RAM bytes.
    pub image_size_ratio: f64,
    /// RAM records written.
    pub records: u64,
    /// Record compression.
    pub compression: Compression,
    /// Faults that waited for a staging buffer.
    pub fault_buffer_waits: u64,
    /// 2 MiB units collapsed back to huge pages after the save.
    pub huge_pages_restored: u64,
    /// An incremental save: the parent (as the request named it). Absent for a full save.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A save asked to be incremental stored all memory instead: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// Guest bytes this file stores (data and zero pages).
    #[serde(default)]
    pub stored_bytes: u64,
    /// Guest bytes this file inherits from its parent (unchanged since the parent's freeze).
    #[serde(default)]
    pub inherited_bytes: u64,
    /// An incremental save: guest pages of written units whose content hash was compared with
    /// the parent's.
    #[serde(default)]
    pub pages_compared: u64,
    /// Of those, pages found unchanged (equal content): left to the parent, not stored.
    #[serde(default)]
    pub pages_unchanged: u64,
    /// Guest memory is write-tracked after this save (the next save may name it as parent).
    #[serde(default)]
    pub tracking: bool,
    /// Built-in guest only: its per-vCPU control slots at the freeze instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_steps: Option<Vec<u64>>,
    /// Built-in guest only: its write rate during the save, steps per second (all vCPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_steps_per_s_during: Option<f64>,
    /// Built-in guest only: the longest time a vCPU made no step, from just before the freeze
    /// to the end of the save, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_max_stall_ms: Option<f64>,
}

/// The outcome of [`save_into`].
#[derive(Debug)]
pub struct Saved {
    /// The machine state at the freeze instant (stored in the snapshot).
    pub state: MachineState,
    /// The freeze's phase times.
    pub freeze: FreezeTimes,
    /// How long arming took (write-protecting all RAM while the guest ran, before the freeze).
    pub arm: Duration,
    /// What the seal at the freeze instant protected again.
    pub seal: SealStats,
    /// When the freeze began (after arming and any staging probe): the start of what the guest
    /// sees of the save.
    pub frozen_at: Instant,
    /// The VM was paused by a client and stays paused.
    pub stayed_paused: bool,
    /// What ram-saver reported.
    pub summary: SaveSummary,
}

/// Write-protection of all guest RAM, released on drop unless handed over to the live save (which
/// releases it itself, whatever happens): created at the seal, the instant all RAM is protected,
/// so no error between the freeze and the save can leave the guest write-protected with nobody
/// serving its faults.
struct Protected<'a> {
    tracker: &'a WpTracker,
    armed: bool,
}

impl<'a> Protected<'a> {
    /// All of RAM is protected now (a write tracker was suspended).
    fn new(tracker: &'a WpTracker) -> Self {
        Protected {
            tracker,
            armed: true,
        }
    }

    /// Seals the armed protection (every vCPU parked): all of RAM protected, or none of it.
    fn seal(armed: &Armed<'_>, tracker: &'a WpTracker) -> Result<(Self, SealStats), WpError> {
        let stats = armed.seal()?;
        Ok((
            Protected {
                tracker,
                armed: true,
            },
            stats,
        ))
    }

    /// The live save owns the protection from here on.
    fn hand_over(mut self) {
        self.armed = false;
    }
}

impl Drop for Protected<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tracker.unprotect_all();
        }
    }
}

/// The protocol of one save into `sink`: everything that can fail is built first, then the freeze
/// instant ([`Vm::freeze`]: vCPUs parked, machine state captured, all RAM write-protected, vCPUs
/// resumed, atomically against other controllers), then [`ram_saver::live_save`]. `tracker` has
/// all of `vm`'s memory registered. Whatever fails, the guest runs on unprotected.
pub fn save_into<S: SnapshotSink>(
    vm: &Vm,
    tracker: &WpTracker,
    sink: S,
    opts: &SaveOptions,
    cancel: &AtomicBool,
    progress: &(dyn Fn(&SaveProgress) + Sync),
) -> Result<Saved, SaveError> {
    let header = header_of(vm)?;
    let run = FreezeRun {
        vm,
        tracker,
        opts,
        cancel,
        progress,
    };
    run.save(sink, header, &mut None, false).map(|(s, _)| s)
}

/// The header of a snapshot of `vm` (no parent).
pub(crate) fn header_of(vm: &Vm) -> Result<SnapshotHeader, SaveError> {
    let cfg = vm.config();
    let vmm_config = serde_json::to_vec(cfg)
        .map_err(|e| SaveError::Params(format!("the VM configuration cannot be recorded: {e}")))?;
    Ok(SnapshotHeader::new(
        Vec::new(),
        u32::from(cfg.vcpus),
        vmm_config,
    ))
}

/// How long [`probe_staging`] watches the guest at most, and how often it looks.
const PROBE_WINDOW: Duration = Duration::from_millis(50);
const PROBE_POLL: Duration = Duration::from_millis(2);

/// Sizes fault staging by watching the guest while all RAM is armed (write-protected, each
/// written 2 MiB unit released at its first write): the units it writes within
/// [`PROBE_WINDOW`] (less once it has written them all) are the units it will fault on during
/// the save, so staging grows to them (up to `cap`) before the freeze, while the guest runs on.
/// A guest writing all over its memory gets staging for all of it (also where it finds new units
/// faster than the window can show them all, as in a large guest), an idle guest the usual
/// 16 MiB, a small hot set its size. The units written meanwhile are protected again by the
/// arming's converge passes and its seal, as any written while armed.
fn probe_staging(
    armed: &Armed<'_>,
    tracker: &WpTracker,
    opts: &SaveOptions,
    cap: usize,
    cancel: &AtomicBool,
) {
    let t = Instant::now();
    let units: usize = tracker
        .registered()
        .iter()
        .map(|r| r.len.div_ceil(ARM_UNIT))
        .sum();
    let mut at_half = None;
    while t.elapsed() < PROBE_WINDOW
        && armed.touched_units() < units
        && !cancel.load(Ordering::SeqCst)
    {
        std::thread::sleep(PROBE_POLL);
        if at_half.is_none() && t.elapsed() >= PROBE_WINDOW / 2 {
            at_half = Some(armed.touched_units());
        }
    }
    if cancel.load(Ordering::SeqCst) {
        return;
    }
    let written = armed.touched_units();
    let window = t.elapsed();
    // Still finding new units as fast at the end as at the start (the second half of the window
    // added at least a third of them), and more than a few: the guest spreads its writes over
    // memory faster than the window shows (each first write waits for the arming's handler), so
    // it will fault all over memory during the save. A hot set or an idle guest levels off.
    let spreading =
        at_half.is_some_and(|h| written > CONVERGED_UNITS && (written - h) * 3 >= written);
    let bytes = if spreading {
        cap
    } else {
        written.saturating_mul(ARM_UNIT).min(cap)
    };
    opts.staging.grow_fault(opts, bytes, written as u64, window);
    log::debug!(
        "staging probe: the guest wrote {written} of {units} units in {:.1} ms; {} MiB prepared",
        window.as_secs_f64() * 1e3,
        opts.staging.fault_bytes() >> 20
    );
}

/// One freeze and live save.
pub(crate) struct FreezeRun<'a> {
    pub(crate) vm: &'a Vm,
    pub(crate) tracker: &'a WpTracker,
    pub(crate) opts: &'a SaveOptions,
    pub(crate) cancel: &'a AtomicBool,
    pub(crate) progress: &'a (dyn Fn(&SaveProgress) + Sync),
}

impl FreezeRun<'_> {
    /// Freeze and save into `sink`. With a running write tracker in `running`, the freeze
    /// suspends it instead of arming (its harvest protects again what was written, so all RAM is
    /// protected) and returns the harvest; with `incremental` the live save stores only that
    /// harvest and Parent runs for the rest. `running` is left `Some` only if the tracker was
    /// never suspended (the freeze failed before); once suspended, the live save owns the
    /// protection.
    pub(crate) fn save<S: SnapshotSink>(
        &self,
        sink: S,
        header: SnapshotHeader,
        running: &mut Option<DirtyTracker>,
        incremental: bool,
    ) -> Result<(Saved, Option<DirtySet>), SaveError> {
        let (vm, tracker, cancel) = (self.vm, self.tracker, self.cancel);
        let t = Instant::now();
        let mut arm = Duration::ZERO;
        let mut frozen_at = t;
        let (frozen, increment) = if let Some(dt) = running.as_ref() {
            // What was written so far is protected again while the guest runs, so the freeze
            // protects again only what it writes from here on (the increment is both: a write in
            // between landed before its unit was protected, or faulted and is in the second).
            // A harvest that fails put its units back: the freeze then takes them all.
            let early = dt.harvest().unwrap_or_default();
            arm = t.elapsed();
            if cancel.load(Ordering::SeqCst) {
                dt.put_back(&early);
                return Err(SaveError::Cancelled);
            }
            frozen_at = Instant::now();
            let frozen = vm.freeze(|_| {
                let dt = running.take().expect("a running tracker");
                let set = dt.suspend()?;
                Ok::<_, DirtyError>((Protected::new(tracker), set))
            });
            let frozen = match frozen {
                Ok(f) => f,
                Err(e) => {
                    if let Some(dt) = running.as_ref() {
                        // Never suspended: tracking goes on, the early harvest counted again.
                        dt.put_back(&early);
                    }
                    return Err(SaveError::TrackedFreeze(e));
                }
            };
            let (protected, set) = frozen.held;
            let set = early.union(&set);
            let frozen = vmm_core::Frozen {
                held: (protected, SealStats::default()),
                state: frozen.state,
                times: frozen.times,
                stayed_paused: frozen.stayed_paused,
            };
            (frozen, Some(set))
        } else {
            // Armed: all RAM write-protected while the guest still runs, its writes served by
            // unprotecting their unit; the freeze then protects again only those units (see
            // `wp_tracker::Armed`), so the downtime does not grow with memory the guest never
            // touches.
            let frozen = tracker
                .protect_all_armed(|armed| {
                    if let Some(cap) = self.opts.staging.probe_cap() {
                        probe_staging(armed, tracker, self.opts, cap, cancel);
                    }
                    // A guest that wrote many units while arming: protect those again while it
                    // still runs, so the freeze protects only what it writes during that
                    // shorter pass.
                    for _ in 0..CONVERGE_PASSES {
                        if armed.touched_units() <= CONVERGED_UNITS {
                            break;
                        }
                        armed.converge().map_err(SaveError::Arm)?;
                    }
                    arm = t.elapsed();
                    // Cancelled while arming: released on the way out, never frozen.
                    if cancel.load(Ordering::SeqCst) {
                        return Err(SaveError::Cancelled);
                    }
                    frozen_at = Instant::now();
                    vm.freeze(|_| Protected::seal(armed, tracker))
                        .map_err(SaveError::Freeze)
                })
                .map_err(SaveError::Arm)??;
            (frozen, None)
        };
        let (protected, seal) = frozen.held;
        let state_bytes = frozen
            .state
            .to_bytes()
            .map_err(|e| SaveError::Freeze(FreezeError::Capture(e)))?;
        let opts;
        let opts = match (&increment, incremental) {
            (Some(set), true) => {
                opts = SaveOptions {
                    increment: Some(set.ranges.clone()),
                    ..self.opts.clone()
                };
                &opts
            }
            _ => self.opts,
        };
        // ram-saver releases every page whatever happens from here on.
        protected.hand_over();
        let res = ram_saver::live_save(
            vm.memory(),
            tracker,
            sink,
            header,
            &state_bytes,
            opts,
            self.progress,
            cancel,
        );
        let summary = match res {
            Ok(s) => s,
            Err(ram_saver::SaveError::Cancelled) => return Err(SaveError::Cancelled),
            Err(e) if cancel.load(Ordering::SeqCst) => {
                return Err(SaveError::Save {
                    source: e,
                    hint: " (cancelled)",
                })
            }
            Err(e) => {
                let hint = find_io_error(&e).map_or("", io_hint);
                return Err(SaveError::Save { source: e, hint });
            }
        };
        let saved = Saved {
            state: frozen.state,
            freeze: frozen.times,
            arm,
            seal,
            frozen_at,
            stayed_paused: frozen.stayed_paused,
            summary,
        };
        Ok((saved, increment))
    }
}

/// A live save as a client asks for it: checks `params`, opens the output before touching the
/// guest (an unwritable target fails without pausing it), runs [`save_into`] and reports.
/// `guest_moving[i]`: vCPU `i` was making progress before the save (for the built-in guest's stall
/// figure; may be empty).
pub fn save(
    vm: &Arc<Vm>,
    tracker: &WpTracker,
    params: &SaveParams,
    guest_moving: &[bool],
    cancel: &AtomicBool,
    progress: &(dyn Fn(&SaveProgress) + Sync),
) -> Result<SaveReport, SaveError> {
    let r = save_checked(vm, tracker, None, params, guest_moving, cancel, progress);
    // A save allocates tens of MiB of staging and I/O buffers on threads that come and go; give
    // the freed memory back so a long-running VMM's RSS returns to where it was.
    uffd_sys::host::trim_heap();
    r
}

/// [`save`] with the VM's write record ([`crate::save_tracked`]).
pub(crate) fn save_with_record(
    vm: &Arc<Vm>,
    tracker: &Arc<WpTracker>,
    record: Option<&mut WriteRecord>,
    params: &SaveParams,
    guest_moving: &[bool],
    cancel: &AtomicBool,
    progress: &(dyn Fn(&SaveProgress) + Sync),
) -> Result<SaveReport, SaveError> {
    let record = record.map(|r| (r, tracker));
    let r = save_checked(vm, tracker, record, params, guest_moving, cancel, progress);
    uffd_sys::host::trim_heap();
    r
}

/// Fault staging to prepare before the freeze: as `params` asks ([`PrepareStaging`]; `auto` by
/// default, from `written`, the bytes the guest wrote since the last save if the VM keeps a
/// record), never more than the save's staging cap.
fn prepare_bytes(
    params: &SaveParams,
    opts: &SaveOptions,
    guest_bytes: u64,
    written: Option<u64>,
) -> usize {
    let cap = staging_cap(opts, guest_bytes);
    let want = match params.prepare_staging.unwrap_or(PrepareStaging::Auto) {
        PrepareStaging::Auto => written.unwrap_or(0),
        PrepareStaging::Bytes(b) => b,
    };
    usize::try_from(want).unwrap_or(usize::MAX).min(cap)
}

/// The fault staging cap of a save with `opts` of a `guest_bytes` guest.
fn staging_cap(opts: &SaveOptions, guest_bytes: u64) -> usize {
    let guest = usize::try_from(guest_bytes).unwrap_or(usize::MAX);
    opts.max_staging
        .unwrap_or_else(|| ram_saver::default_max_staging(guest))
        .min(guest)
}

#[allow(clippy::too_many_arguments)]
fn save_checked(
    vm: &Arc<Vm>,
    tracker: &WpTracker,
    record: Option<(&mut WriteRecord, &Arc<WpTracker>)>,
    params: &SaveParams,
    guest_moving: &[bool],
    cancel: &AtomicBool,
    progress: &(dyn Fn(&SaveProgress) + Sync),
) -> Result<SaveReport, SaveError> {
    let opts = params.options().map_err(SaveError::Params)?;
    // Staging faulted in now, while the guest still runs, not by the first copies after the thaw.
    let written = record.as_ref().and_then(|(r, _)| r.status().dirty_bytes);
    // Prepared buffers are scan units; faults use them only where a fault copies a whole unit
    // (huge-page memory), not on memfd's 4 KiB pages (64 KiB fault blocks).
    let whole_units = vm.config().backend != vmm_core::MemBackend::Memfd
        && opts.fault_block_size.is_none_or(|f| f == opts.block_size);
    let prepare = if whole_units {
        prepare_bytes(params, &opts, vm.config().mem_bytes, written)
    } else {
        0
    };
    let mut staging = ram_saver::Staging::prepare_fault(&opts, prepare);
    // No record of what the guest writes (a VM's first save, `--track-writes off`): the armed
    // freeze watches it first and grows staging to what it writes ([`probe_staging`]).
    if whole_units
        && written.is_none()
        && params.prepare_staging.unwrap_or(PrepareStaging::Auto) == PrepareStaging::Auto
    {
        staging = staging.size_by_probe(staging_cap(&opts, vm.config().mem_bytes));
    }
    let opts = SaveOptions {
        staging,
        // What the save leaves protected is what write tracking goes on with.
        keep_protected: record.is_some(),
        ..opts
    };
    let job = Job {
        vm,
        tracker,
        record,
        params,
        opts: &opts,
        guest_moving,
        cancel,
        progress,
    };
    let target = Path::new(&params.path);
    if params.stream {
        let f = open_stream(target, cancel)?;
        return job.run(StreamSink::new(CancellableWriter { f, cancel }));
    }
    match std::fs::metadata(target) {
        Ok(m) if m.is_dir() => {
            return Err(SaveError::TargetRefused(format!(
                "{} is a directory; name a file to save to",
                target.display()
            )))
        }
        Ok(_) if !params.force => {
            return Err(SaveError::TargetRefused(format!(
                "{} already exists; pass --force to replace it",
                target.display()
            )))
        }
        _ => {}
    }
    let sink = if params.force {
        AtomicFileSink::create(target)
    } else {
        AtomicFileSink::create_new(target)
    };
    let sink = sink.map_err(|source| SaveError::Target {
        what: format!("cannot create a file beside {}: {source}", target.display()),
        source,
    })?;
    job.run(sink)
}

/// One save's inputs, for running it on either kind of sink.
struct Job<'a> {
    vm: &'a Arc<Vm>,
    tracker: &'a WpTracker,
    record: Option<(&'a mut WriteRecord, &'a Arc<WpTracker>)>,
    params: &'a SaveParams,
    opts: &'a SaveOptions,
    guest_moving: &'a [bool],
    cancel: &'a AtomicBool,
    progress: &'a (dyn Fn(&SaveProgress) + Sync),
}

impl Job<'_> {
    fn run<S: SnapshotSink>(self, sink: S) -> Result<SaveReport, SaveError> {
        // Started before the freeze: the guest's stall figure includes the downtime.
        let monitor = self
            .vm
            .config()
            .is_builtin_guest()
            .then(|| ProgressMonitor::start(self.vm, self.guest_moving.to_vec()));
        let Some((record, wp)) = self.record else {
            let saved = save_into(
                self.vm,
                self.tracker,
                sink,
                self.opts,
                self.cancel,
                self.progress,
            )?;
            let guest = monitor.map(|m| m.finish(saved.frozen_at));
            return Ok(report(self.params, self.vm, &saved, guest));
        };
        let run = FreezeRun {
            vm: self.vm,
            tracker: self.tracker,
            opts: self.opts,
            cancel: self.cancel,
            progress: self.progress,
        };
        let path = (!self.params.stream).then(|| Path::new(&self.params.path));
        let parent = self.params.parent.as_deref();
        let t = record.save(&run, wp, sink, path, parent, !self.params.no_page_hashes)?;
        let guest = monitor.map(|m| m.finish(t.saved.frozen_at));
        let mut r = report(self.params, self.vm, &t.saved, guest);
        r.parent = t.parent;
        r.full_reason = t.full_reason;
        r.tracking = t.tracking;
        Ok(r)
    }
}

pub(crate) fn report(
    params: &SaveParams,
    vm: &Vm,
    saved: &Saved,
    guest: Option<crate::monitor::GuestDuringSave>,
) -> SaveReport {
    let s = &saved.summary;
    let downtime = saved.freeze.total();
    SaveReport {
        path: params.path.clone(),
        guest_bytes: vm.config().mem_bytes,
        duration_s: s.duration_secs + downtime.as_secs_f64(),
        downtime_ms: downtime.as_secs_f64() * 1e3,
        freeze_ms: FreezeMs::new(saved.arm, saved.freeze),
        stayed_paused: saved.stayed_paused,
        pages_saved: s.pages_saved,
        zero_pages: s.zero_pages,
        data_pages: s.data_pages,
        faults_served: s.faults_served,
        fault_latency_p50_us: s.fault_latency_p50_us,
        fault_latency_p99_us: s.fault_latency_p99_us,
        fault_latency_max_us: s.fault_latency_max_us,
        fault_wait_total_ms: s.fault_latency_total_us as f64 / 1e3,
        fault_phases_us: s.fault_phases,
        staging: s.staging,
        file_bytes: s.file_bytes,
        image_size_ratio: s.image_size_ratio,
        records: s.records,
        compression: params.compression(),
        fault_buffer_waits: s.fault_buffer_waits,
        huge_pages_restored: s.huge_pages_restored,
        parent: None,
        full_reason: None,
        stored_bytes: (s.zero_pages + s.data_pages) * 4096,
        inherited_bytes: s.parent_pages * 4096,
        pages_compared: s.pages_compared,
        pages_unchanged: s.pages_unchanged,
        tracking: false,
        // Figures only the built-in guest can give are absent for kernel guests, never a zero
        // that reads as "no stall".
        freeze_steps: guest.as_ref().map(|_| saved.state.guest_slots()),
        guest_steps_per_s_during: guest.as_ref().map(|g| g.steps_per_s),
        guest_max_stall_ms: guest.as_ref().map(|g| g.max_stall_ms),
    }
}

/// Opens a stream target (a FIFO the client reads) for writing without ever blocking on it: the
/// open waits at most [`STREAM_OPEN_TIMEOUT`] for a reader, and writes go through
/// [`CancellableWriter`].
fn open_stream(target: &Path, cancel: &AtomicBool) -> Result<std::fs::File, SaveError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta = std::fs::metadata(target).map_err(|source| SaveError::Target {
        what: format!("stream target {}: {source}", target.display()),
        source,
    })?;
    let ft = meta.file_type();
    if !(ft.is_fifo() || ft.is_socket() || ft.is_char_device()) {
        return Err(SaveError::TargetRefused(format!(
            "stream target {} is not a FIFO, socket or character device",
            target.display()
        )));
    }
    let deadline = Instant::now() + STREAM_OPEN_TIMEOUT;
    loop {
        let res = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(target);
        match res {
            Ok(f) => return Ok(f),
            // A FIFO without a reader (yet).
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENXIO as i32) => {
                if cancel.load(Ordering::SeqCst) {
                    return Err(SaveError::Cancelled);
                }
                if Instant::now() >= deadline {
                    return Err(SaveError::TargetRefused(format!(
                        "nobody opened the stream {} for reading within {} s",
                        target.display(),
                        STREAM_OPEN_TIMEOUT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(SaveError::Target {
                    what: format!("opening stream {}: {source}", target.display()),
                    source,
                })
            }
        }
    }
}

/// A non-blocking stream output whose writes wait for room in bounded slices and give up when the
/// save is cancelled: a reader that stops reading can stall the save (back pressure), but never
/// keeps it from being cancelled.
struct CancellableWriter<'a> {
    f: std::fs::File,
    cancel: &'a AtomicBool,
}

impl Write for CancellableWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::os::fd::AsFd;
        loop {
            match self.f.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.cancel.load(Ordering::SeqCst) {
                        return Err(std::io::Error::other("save cancelled"));
                    }
                    let mut fds = [nix::poll::PollFd::new(
                        self.f.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                    )];
                    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A plain-words hint for common I/O failures while writing a snapshot.
fn io_hint(e: &std::io::Error) -> &'static str {
    use nix::errno::Errno;
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOSPC) => {
            " (no space left on the target's file system: free some, or save elsewhere)"
        }
        Some(Errno::EDQUOT) => " (disk quota exceeded: free some space, or save elsewhere)",
        Some(Errno::EROFS) => " (the target's file system is read-only: save elsewhere)",
        Some(Errno::EACCES) | Some(Errno::EPERM) => " (is the directory writable?)",
        Some(Errno::ENOENT) => " (does the directory exist?)",
        Some(Errno::EPIPE) => " (the reader of the stream went away)",
        _ => "",
    }
}

/// The first I/O error in an error's chain, for [`io_hint`].
fn find_io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Staging prepared before the freeze: `auto` follows what the guest wrote since the last
    /// save (nothing extra without a record), a size is taken as asked; both stay within the
    /// staging cap and guest RAM.
    #[test]
    fn prepared_staging_follows_the_request_within_the_cap() {
        const MIB: u64 = 1 << 20;
        let params = |p| SaveParams {
            path: "/tmp/x.snap".into(),
            prepare_staging: p,
            ..SaveParams::default()
        };
        let opts = SaveOptions {
            max_staging: Some(256 << 20),
            ..SaveOptions::default()
        };
        let guest = 1024 * MIB;
        let n = |p, written| prepare_bytes(&params(p), &opts, guest, written) as u64;
        assert_eq!(n(None, Some(100 * MIB)), 100 * MIB);
        assert_eq!(n(Some(PrepareStaging::Auto), Some(100 * MIB)), 100 * MIB);
        assert_eq!(n(Some(PrepareStaging::Auto), None), 0);
        assert_eq!(n(None, Some(2048 * MIB)), 256 * MIB);
        assert_eq!(
            n(Some(PrepareStaging::Bytes(64 * MIB)), Some(900 * MIB)),
            64 * MIB
        );
        assert_eq!(n(Some(PrepareStaging::Bytes(0)), Some(900 * MIB)), 0);
        assert_eq!(n(Some(PrepareStaging::Bytes(u64::MAX)), None), 256 * MIB);
        // Without a cap of the caller's: never more than guest RAM.
        let small = prepare_bytes(
            &params(None),
            &SaveOptions::default(),
            64 * MIB,
            Some(1 << 40),
        );
        assert!(small as u64 <= 64 * MIB);
    }
}
