//! The fault thread and the fault-priority policy: everything that decides how long a guest
//! write to a protected page waits is here. The measurements behind each choice are in
//! `docs/PERFORMANCE.md`.
//!
//! # What a fault copies
//! [`fault_block_size`]: the caller's choice, else the whole unit (2 MiB) on hugetlbfs (which
//! cannot release less than a huge page) and on memory mostly (at least half) backed by
//! transparent huge pages, else 64 KiB. On THP memory a fault then copies and releases a whole
//! huge page, which stays huge: smaller releases split it, and under shadow paging (PVM) every
//! change to the host mapping of guest RAM invalidates KVM's shadow MMU for that range, so the
//! guest re-faults its shadow entries 4 KiB at a time until the page is collapsed back; that
//! costs the guest far more than the longer copy. On 4 KiB-page memory (memfd) nothing stays huge
//! anyway; there 64 KiB units (16 pages per round trip, served in tens of µs) left the guest
//! about three times the rate of 4 KiB ones.
//!
//! # How a fault is served
//! The fault thread is the first saver thread started (vCPUs already run and block on their
//! first write). It reads a batch of faults and hands all but the first to a helper thread
//! ([`Handoff`]): each of them takes the next fault, so faults of several vCPUs are served side by
//! side. For each fault: claim the faulting sub-block, copy it into fault staging and release it,
//! waking the vCPU; the bookkeeping (queueing the copy
//! for the workers, latencies) follows once per batch, after every vCPU of the batch runs again.
//! No compression, no I/O. A sub-block the scanner holds is left to the scanner, whose release
//! wakes the writer; a stale fault on a released one gets a wake. In a save that keeps saved
//! memory protected (write tracking), a fault on a sub-block already saved (or inherited from
//! the parent) is only released, and the fault thread serves until the file is committed. The thread blocks in poll
//! ([`DEFAULT_SPIN`]: a spinning thread takes the CPU the vCPUs and workers need on small
//! hosts) and runs at nice [`DEFAULT_FAULT_NICE`] where permitted, so a fault does not queue
//! behind the copies of the scanner and the workers.
//!
//! # Fault staging
//! Faults copy into their own pool ([`staging`](super::staging)), so they never wait for the
//! scan's buffers; it grows on demand up to its cap. At the cap, the fault thread first hands
//! what it holds back to the workers, then waits for a buffer
//! ([`StagingFigures`](super::StagingFigures) counts those waits and their time).
//!
//! # Phases
//! [`FaultPhases`] splits the fault thread's time: reading queued events, a fault waiting in its
//! batch behind earlier ones, the claim, getting a staging buffer, the copy, the release (unprotect
//! and wake), and the per-batch bookkeeping.
//!
//! # When the scanner yields to faults
//! [`Shared::yield_to_faults`]: while more than half of the fault pool is in use, the scanner
//! claims nothing until it drains below a quarter, so the workers and the writer serve fault
//! data only and the guest gets its buffers back first. A unit the scanner has claimed is
//! copied and released without waiting on anything but its copy (the bandwidth throttle runs
//! before the claim).
//!
//! # Output priority
//! Workers take every queued fault item (up to [`FAULT_BATCH_BYTES`], encoded as one batch)
//! before any scan item ([`Shared::pop_work`]). Encoded fault batches reach the writer through
//! their own bounded queue, which the writer empties before the scan's
//! ([`Shared::send_batch`], [`Shared::recv_batch`]).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wp_tracker::HostRange;

use super::blocks::{CLAIMED, WANTED};
use super::huge::{mostly_thp, HUGE_PAGE};
use super::{lock, InjectPoint, Run, SaveError, SaveOptions, Shared, Work, PAGE_SIZE, POLL};
use crate::writer::EncodedBatch;

/// Unit of the fault thread on 4 KiB-page memory (THP- and hugetlbfs-backed memory use the whole
/// unit): 16 pages per fault round trip (`docs/PERFORMANCE.md`, "Fault unit").
const DEFAULT_FAULT_BLOCK: usize = 64 << 10;
/// Default of [`SaveOptions::fault_nice`].
pub(super) const DEFAULT_FAULT_NICE: i32 = -10;
/// Default of [`SaveOptions::fault_spin`].
pub(super) const DEFAULT_SPIN: bool = false;
/// A spinning fault thread yields its core between polls after this long without faults.
const SPIN_IDLE: Duration = Duration::from_millis(1);
/// Fault items a worker encodes into one batch, at most (bytes).
const FAULT_BATCH_BYTES: usize = 1 << 20;
/// Encoded fault batches waiting for the writer, at most.
pub(super) const OUT_FAULT_CAP: usize = 16;
/// The scanner pauses while more than this share of the fault pool is in use …
const SCAN_PAUSE_AT: (usize, usize) = (1, 2);
/// … until less than this share is.
const SCAN_RESUME_AT: (usize, usize) = (1, 4);

/// Where the fault thread's time went, in µs summed over the save (divide by `faults` for a
/// fault's mean). Together with the guest's own re-entry (on PVM: rebuilding its shadow page
/// tables for a released range) this is what a guest write to protected memory costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FaultPhases {
    /// Faults served (copied and released by the fault thread).
    pub faults: u64,
    /// Batches of faults read.
    pub batches: u64,
    /// Reading events already queued (read(2) of the userfaultfd; time blocked in poll waiting
    /// for a fault is not counted).
    pub read_us: u64,
    /// Faults waiting behind earlier faults of their batch.
    pub queue_us: u64,
    /// Claiming the sub-block.
    pub claim_us: u64,
    /// Getting a staging buffer (allocation, or a wait at the cap).
    pub staging_us: u64,
    /// Copying the sub-block into staging.
    pub copy_us: u64,
    /// Releasing it: unprotect and wake the vCPU.
    pub release_us: u64,
    /// Per batch, after every vCPU of the batch runs again: queueing the copies for the workers,
    /// recording latencies.
    pub bookkeeping_us: u64,
}

/// [`FaultPhases`] being measured, in nanoseconds.
#[derive(Debug, Default)]
struct PhaseClock {
    faults: u64,
    batches: u64,
    read: u64,
    queue: u64,
    claim: u64,
    staging: u64,
    copy: u64,
    release: u64,
    bookkeeping: u64,
}

impl PhaseClock {
    /// Nanoseconds from `t` to now, and now.
    fn lap(t: &mut Instant) -> u64 {
        let now = Instant::now();
        let ns = now.duration_since(*t).as_nanos() as u64;
        *t = now;
        ns
    }

    fn add_to(&mut self, p: &mut FaultPhases) {
        let us = |ns: &mut u64| std::mem::take(ns) / 1000;
        p.faults += std::mem::take(&mut self.faults);
        p.batches += std::mem::take(&mut self.batches);
        p.read_us += us(&mut self.read);
        p.queue_us += us(&mut self.queue);
        p.claim_us += us(&mut self.claim);
        p.staging_us += us(&mut self.staging);
        p.copy_us += us(&mut self.copy);
        p.release_us += us(&mut self.release);
        p.bookkeeping_us += us(&mut self.bookkeeping);
    }
}

/// Faults of a batch that the fault thread has not served yet, for whichever of it and its helper
/// is free first: with several vCPUs faulting at once, a fault need not wait behind another's
/// copy.
#[derive(Debug, Default)]
pub(super) struct Handoff {
    faults: Mutex<HandoffQueue>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct HandoffQueue {
    queue: VecDeque<(usize, Instant)>,
    /// The fault thread is done: the helper ends.
    done: bool,
}

/// Tells the helper that the fault thread is done (when dropped, also on a panic, which then
/// aborts the save first).
struct HandoffEnd<'s, 'a>(&'s Shared<'a>);

impl Drop for HandoffEnd<'_, '_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.abort(SaveError::ThreadPanicked("fault"));
        }
        lock(&self.0.handoff.faults).done = true;
        self.0.handoff.cv.notify_all();
    }
}

/// Aborts the save when the helper thread panics.
struct HelperPanic<'s, 'a>(&'s Shared<'a>);

impl Drop for HelperPanic<'_, '_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.abort(SaveError::ThreadPanicked("fault helper"));
        }
    }
}

/// The fault thread's unit: the caller's choice, else the whole unit on hugetlbfs (which cannot
/// release less than a huge page) and on memory mostly backed by transparent huge pages (see the
/// module docs: splitting them costs the guest far more than the longer copy), else
/// [`DEFAULT_FAULT_BLOCK`].
pub(super) fn fault_block_size(
    mem: &GuestMemoryMmap,
    opts: &SaveOptions,
    huge: &[(usize, usize)],
) -> Result<usize, SaveError> {
    let hugetlb = mem.iter().any(|r| r.is_hugetlbfs() == Some(true));
    let fb = match opts.fault_block_size {
        Some(fb) => fb,
        None if hugetlb => opts.block_size,
        None if opts.block_size.is_multiple_of(HUGE_PAGE) && mostly_thp(mem, huge) => {
            opts.block_size
        }
        None => DEFAULT_FAULT_BLOCK.min(opts.block_size),
    };
    if fb == 0 || !fb.is_multiple_of(PAGE_SIZE) || !opts.block_size.is_multiple_of(fb) {
        return Err(SaveError::InvalidOptions(format!(
            "fault block size {fb} is not a multiple of {PAGE_SIZE} dividing the block size {}",
            opts.block_size
        )));
    }
    Ok(fb)
}

impl Shared<'_> {
    /// Fault thread: serve faults until every block is released (or the save stops), with a
    /// helper thread (at nice `nice`, like this one) that serves the faults of a batch this
    /// thread has not got to yet.
    pub(super) fn fault_loop(&self, nice: Option<i32>) -> Result<(), SaveError> {
        thread::scope(|s| {
            let helper = thread::Builder::new()
                .name("saver-fault-2".into())
                .spawn_scoped(s, || {
                    // A panic here aborts the save at once: a sub-block it claimed would
                    // otherwise stay protected with nobody to release it.
                    let _p = HelperPanic(self);
                    if let Some(n) = nice {
                        // Best effort, as for the fault thread.
                        let _ = uffd_sys::host::set_thread_nice(n);
                    }
                    if let Err(e) = self.help_with_faults() {
                        self.abort(e);
                    }
                });
            let r = {
                // Ends the helper also when this thread panics: the scope joins it before the
                // panic goes on.
                let _end = HandoffEnd(self);
                self.serve_faults()
            };
            if let Ok(h) = helper {
                // Its panic already aborted the save (HelperPanic).
                let _ = h.join();
            }
            r
        })
    }

    /// The fault thread's loop: read a batch of faults, hand all but the first to the helper,
    /// serve the first, then whatever the helper has not taken.
    fn serve_faults(&self) -> Result<(), SaveError> {
        let mut faults = Vec::with_capacity(256);
        let mut pending = Vec::with_capacity(256);
        let mut lat = Vec::with_capacity(256);
        let mut clock = PhaseClock::default();
        let mut idle_since = Instant::now();
        loop {
            if self.stopped() {
                return Ok(());
            }
            if self.scan_done.load(Ordering::Acquire) && self.all_released() {
                if self.keep_protected {
                    // Events left are writes to saved memory: `serve_releases` serves them.
                    return Ok(());
                }
                // Stale events: their threads were woken by the release; wake again anyway.
                faults.clear();
                self.tracker
                    .read_faults(&mut faults)
                    .map_err(SaveError::Tracker)?;
                for f in &faults {
                    self.wake_page(f.addr)?;
                }
                return Ok(());
            }
            faults.clear();
            let mut t = Instant::now();
            let queued = self
                .tracker
                .read_faults(&mut faults)
                .map_err(SaveError::Tracker)?;
            if queued > 0 {
                clock.read += PhaseClock::lap(&mut t);
            } else if self.spin {
                // Busy-poll: no wakeup latency, at the price of a core while the save runs.
                if idle_since.elapsed() > SPIN_IDLE {
                    // Let others run now and then; keeps a stuck save from hogging a core.
                    thread::yield_now();
                }
                std::hint::spin_loop();
                continue;
            } else {
                self.tracker
                    .wait_faults(POLL, &mut faults)
                    .map_err(SaveError::Tracker)?;
            }
            if faults.is_empty() {
                continue;
            }
            idle_since = Instant::now();
            let read_at = idle_since;
            self.last_fault_us.store(
                self.started.elapsed().as_micros().max(1) as u64,
                Ordering::Relaxed,
            );
            clock.batches += 1;
            if faults.len() > 1 {
                let mut h = lock(&self.handoff.faults);
                h.queue
                    .extend(faults[1..].iter().map(|f| (f.addr, read_at)));
                drop(h);
                self.handoff.cv.notify_one();
            }
            self.serve_fault(faults[0].addr, read_at, &mut pending, &mut lat, &mut clock)?;
            while let Some((addr, at)) = self.take_handed_off(false) {
                self.serve_fault(addr, at, &mut pending, &mut lat, &mut clock)?;
            }
            // Bookkeeping once per batch, after every vCPU of the batch was released.
            let mut t = Instant::now();
            self.push_fault_work(&mut pending);
            if !lat.is_empty() {
                self.faults_served
                    .fetch_add(lat.len() as u64, Ordering::Relaxed);
                lock(&self.latencies_us).append(&mut lat);
            }
            clock.bookkeeping += PhaseClock::lap(&mut t);
            clock.add_to(&mut lock(&self.phases));
        }
    }

    /// After every sub-block is saved (keep-protected saves): serve write faults by releasing
    /// the saved sub-block, until the file is committed; then read nothing more, leaving later
    /// faults queued for whoever tracks writes next.
    pub(super) fn serve_releases(&self) -> Result<(), SaveError> {
        let mut faults = Vec::with_capacity(64);
        while !self.stopped() && !self.serve_until.load(Ordering::Acquire) {
            faults.clear();
            self.tracker
                .wait_faults(POLL, &mut faults)
                .map_err(SaveError::Tracker)?;
            for f in &faults {
                let Some((i, u)) = self.blocks.find(f.addr) else {
                    continue;
                };
                self.release_written(i, u, f.addr)?;
            }
        }
        Ok(())
    }

    /// The helper: serve handed-off faults until the fault thread is done.
    fn help_with_faults(&self) -> Result<(), SaveError> {
        let mut pending = Vec::new();
        let mut lat = Vec::new();
        let mut clock = PhaseClock::default();
        while let Some((addr, at)) = self.take_handed_off(true) {
            self.serve_fault(addr, at, &mut pending, &mut lat, &mut clock)?;
            while let Some((addr, at)) = self.take_handed_off(false) {
                self.serve_fault(addr, at, &mut pending, &mut lat, &mut clock)?;
            }
            self.push_fault_work(&mut pending);
            if !lat.is_empty() {
                self.faults_served
                    .fetch_add(lat.len() as u64, Ordering::Relaxed);
                lock(&self.latencies_us).append(&mut lat);
            }
            clock.add_to(&mut lock(&self.phases));
        }
        Ok(())
    }

    /// The oldest handed-off fault (address, when it was read); with `wait`, waits for one
    /// until the fault thread is done or the save stops.
    fn take_handed_off(&self, wait: bool) -> Option<(usize, Instant)> {
        let mut h = lock(&self.handoff.faults);
        loop {
            if let Some(f) = h.queue.pop_front() {
                return Some(f);
            }
            if !wait || h.done || self.stopped() {
                return None;
            }
            h = self
                .handoff
                .cv
                .wait_timeout(h, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    fn wake_page(&self, addr: usize) -> Result<(), SaveError> {
        if self.blocks.find(addr).is_none() {
            return Ok(());
        }
        let start = addr & !(PAGE_SIZE - 1);
        self.tracker
            .wake(HostRange {
                start,
                len: PAGE_SIZE,
            })
            .map_err(SaveError::Tracker)
    }

    /// Claim, copy and release the sub-block at `addr`; its work goes to `pending`, its service
    /// latency to `lat` (both handed on once per batch of faults) and its phase times to `clock`.
    fn serve_fault(
        &self,
        addr: usize,
        read_at: Instant,
        pending: &mut Vec<Work>,
        lat: &mut Vec<u64>,
        clock: &mut PhaseClock,
    ) -> Result<(), SaveError> {
        let Some((i, u)) = self.blocks.find(addr) else {
            return Ok(());
        };
        let mut t = Instant::now();
        clock.queue += t.duration_since(read_at).as_nanos() as u64;
        let claimed = self.blocks.claim(i);
        clock.claim += PhaseClock::lap(&mut t);
        match claimed {
            Ok(()) => {
                if self.inject == Some(InjectPoint::FaultPanic) {
                    panic!("injected fault thread failure");
                }
                let buf = match self.fault_pool.try_acquire() {
                    Some(b) => Some(b),
                    None => {
                        // At the cap: what we hold back must reach the workers first, or
                        // nothing would ever come back.
                        self.push_fault_work(pending);
                        self.acquire_buffer(true)
                    }
                };
                clock.staging += PhaseClock::lap(&mut t);
                let Some(mut buf) = buf else {
                    return Ok(());
                };
                let b = self.blocks.block(i);
                self.copy_claimed(self.range_of(i, 1), &mut buf[..b.len])?;
                clock.copy += PhaseClock::lap(&mut t);
                if self.blocks.huge[u] && b.len < self.blocks.units[u].len {
                    // Set before the release, so whoever sees RELEASED also sees the split.
                    self.blocks.split[u].store(true, Ordering::Release);
                }
                self.release_run(i, 1)?;
                clock.release += PhaseClock::lap(&mut t);
                clock.faults += 1;
                lat.push(read_at.elapsed().as_micros() as u64);
                self.bytes_scanned
                    .fetch_add(b.len as u64, Ordering::Relaxed);
                pending.push(Work::Data {
                    buf,
                    runs: vec![Run {
                        first_page: b.gpa / PAGE_SIZE as u64,
                        off: 0,
                        len: b.len,
                    }],
                    fault: true,
                    hot: true,
                });
                Ok(())
            }
            // The scanner holds it: its release wakes the faulting thread.
            Err(CLAIMED) if !self.keep_protected => Ok(()),
            // The scanner holds it and would leave it protected: ask it to release it, unless
            // it just finished (then it is SAVED: release it here).
            Err(CLAIMED) => match self.blocks.state[i].compare_exchange(
                CLAIMED,
                WANTED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) | Err(WANTED) => Ok(()),
                Err(_) => self.release_written(i, u, addr),
            },
            Err(WANTED) => Ok(()),
            Err(_) => self.release_written(i, u, addr),
        }
    }

    /// A fault on a sub-block that is SAVED (still protected, its content already in the file
    /// or the parent's) or RELEASED (a stale event): release the first, wake the second.
    fn release_written(&self, i: usize, u: usize, addr: usize) -> Result<(), SaveError> {
        if self.blocks.huge[u] && self.blocks.block(i).len < self.blocks.units[u].len {
            self.blocks.split[u].store(true, Ordering::Release);
        }
        if self.release_saved(i)? {
            return Ok(());
        }
        // Already released: the event is stale, but make sure nobody sleeps.
        self.wake_page(addr)
    }

    /// Queue fault work, and the scanner's work staged in fault staging (never waits: fault
    /// staging is bounded by its cap).
    pub(super) fn push_fault_work(&self, w: &mut Vec<Work>) {
        if w.is_empty() {
            return;
        }
        let n = w.len();
        lock(&self.queues).fault.extend(w.drain(..));
        if n == 1 {
            self.work_cv.notify_one();
        } else {
            self.work_cv.notify_all();
        }
    }

    /// While the fault pool is more than [`SCAN_PAUSE_AT`] in use, the scanner waits (holding
    /// nothing claimed) until it drains below [`SCAN_RESUME_AT`]: the workers and the writer
    /// then serve fault data only, so the guest gets its buffers back before the scan's. Not
    /// when fault staging can hold every sub-block at once (the default cap, on a host with the
    /// memory to spare).
    pub(super) fn yield_to_faults(&self) {
        let pool = &self.fault_pool;
        if self.staging_holds_everything() {
            // Every sub-block fits in fault staging at once: no fault can ever wait for it.
            return;
        }
        let (pause, resume) = (
            pool.cap * SCAN_PAUSE_AT.0 / SCAN_PAUSE_AT.1,
            pool.cap * SCAN_RESUME_AT.0 / SCAN_RESUME_AT.1,
        );
        if pool.in_use() <= pause {
            return;
        }
        let mut g = lock(&pool.state);
        while g.allocated - g.free.len() > resume && !self.stopped() {
            g = pool
                .cv
                .wait_timeout(g, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// Next work into `out`: every queued fault item up to [`FAULT_BATCH_BYTES`] (they are
    /// encoded into one batch), else one scan item. False when both producers are done and
    /// the queues are empty, or the save stops.
    pub(super) fn pop_work(&self, out: &mut Vec<Work>) -> bool {
        let mut q = lock(&self.queues);
        loop {
            if self.stopped() {
                return false;
            }
            if !q.fault.is_empty() {
                let mut bytes = 0;
                while let Some(w) = q.fault.pop_front() {
                    if let Work::Data { runs, .. } = &w {
                        bytes += runs.iter().map(|r| r.len).sum::<usize>();
                    }
                    out.push(w);
                    if bytes >= FAULT_BATCH_BYTES {
                        break;
                    }
                }
                return true;
            }
            if let Some(w) = q.scan.pop_front() {
                drop(q);
                self.space_cv.notify_one();
                out.push(w);
                return true;
            }
            if q.producers_done == 2 {
                return false;
            }
            q = self
                .work_cv
                .wait_timeout(q, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// Hand an encoded batch to the writer; waits while that kind's output queue is full.
    pub(super) fn send_batch(&self, b: EncodedBatch, fault: bool) -> bool {
        let mut q = lock(&self.out);
        loop {
            if self.stopped() || q.writer_gone {
                return false;
            }
            let (len, cap) = if fault {
                (q.fault.len(), OUT_FAULT_CAP)
            } else {
                (q.scan.len(), self.scan_queue_cap)
            };
            if len < cap {
                break;
            }
            q = self
                .out_cv
                .wait_timeout(q, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        if fault {
            q.fault.push_back(b);
        } else {
            q.scan.push_back(b);
        }
        drop(q);
        self.out_cv.notify_all();
        true
    }

    /// Next encoded batch for the writer, fault batches first; `Ok(None)` when all workers are
    /// done and nothing is left; `Err(())` on timeout.
    pub(super) fn recv_batch(&self, timeout: Duration) -> Result<Option<EncodedBatch>, ()> {
        let mut q = lock(&self.out);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(b) = q.fault.pop_front().or_else(|| q.scan.pop_front()) {
                drop(q);
                self.out_cv.notify_all();
                return Ok(Some(b));
            }
            if q.workers_left == 0 {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(());
            }
            q = self
                .out_cv
                .wait_timeout(q, deadline - now)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }
}
