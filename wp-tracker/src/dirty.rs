//! Tracking which guest memory is written between two instants, with synchronous write-protect.
//!
//! A [`DirtyTracker`] keeps every registered range of a [`WpTracker`] write-protected and runs a
//! handler thread: the first write to a protected unit faults, the handler marks the unit dirty
//! and releases it (the writer runs on), so later writes to it cost nothing. [`DirtyTracker::harvest`]
//! takes the dirty set and protects those units again; the next writes to them fault again and
//! count for the next harvest. Writes by vCPUs, by other threads and by the kernel on behalf of
//! this process (`read(2)` into guest memory, KVM's own accesses) all fault, because the
//! tracker's userfaultfd handles kernel-mode faults.
//!
//! Why synchronous write-protect and not `UFFD_FEATURE_WP_ASYNC`: the kernel resolves an async
//! write fault on a write-protected transparent huge page by splitting it (one 4 KiB pte loses its
//! uffd-wp bit), so async tracking leaves written memory on 4 KiB pages. Here the handler
//! releases a whole 2 MiB unit that a huge page backs, which keeps it huge (see
//! [`Precision::Backing`]), and the same mechanism serves a live save's fault thread. The design
//! and the measurements are in `docs/INCREMENTAL.md`.
//!
//! Correctness of a harvest while writers run: the dirty set is swapped for an empty one first,
//! then the taken units are protected again; the handler marks and releases a unit under the
//! same lock as the swap, so a release never lands between a swap and the protection of what
//! it took. A write to a taken unit either lands before its
//! protection (the unit is in the taken set) or faults after it (the unit goes into the next
//! set); a fault the handler serves after the swap marks the next set. So every write since
//! the previous harvest is in the taken set or in a later one. A unit can be in two harvests for
//! one write: its writer faulted and was released, and the harvest protected the unit again
//! before the writer retried the store, which then faults again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use uffd_sys::pagemap::{open_self, scan_in, ScanQuery};
use uffd_sys::{PAGE_IS_HUGE, PAGE_IS_PRESENT};

use crate::{HostRange, WpError, WpFault, WpTracker};

/// The unit a write is recorded and released at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// The written base page (4 KiB): exact, one fault per written page; releasing one page of
    /// a transparent huge page splits it.
    Page,
    /// The 2 MiB unit around the written page (clipped to its range): one fault per unit, huge
    /// pages stay huge, every page of a written unit counts as written.
    Unit,
    /// The whole 2 MiB unit when a huge page maps all of it, the written page otherwise: exact on
    /// memory mapped by 4 KiB pages, 2 MiB on huge pages, which stay huge.
    Backing,
    /// As [`Precision::Backing`], but on memory mapped by 4 KiB pages the aligned block of this
    /// many bytes (a power of two from the page size to 2 MiB) around the written page: one
    /// fault per block instead of one per page, for a guest that writes much of its memory.
    BackingBlock(usize),
}

/// The size of a [`Precision::Unit`] unit (the x86-64 huge page size).
pub const DIRTY_UNIT: usize = 2 << 20;

/// Errors of a [`DirtyTracker`].
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The write-protect tracker has no registered range to track.
    #[error("no memory is registered with the write-protect tracker: register guest memory first")]
    NothingRegistered,
    /// Protecting, releasing or reading faults failed.
    #[error("dirty tracking failed")]
    Wp(#[from] WpError),
    /// The handler thread could not be started.
    #[error("cannot start the dirty-tracking handler thread")]
    Thread(#[source] std::io::Error),
    /// The handler thread stopped on an error; everything was released and tracking is off.
    #[error("the dirty-tracking handler stopped: {0}; memory is released and untracked")]
    HandlerStopped(String),
}

/// The units written between two harvests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// Written runs, in address order, adjacent units merged.
    pub ranges: Vec<HostRange>,
}

impl DirtySet {
    /// The union of `self` and `other`, merged, in address order.
    pub fn union(&self, other: &DirtySet) -> DirtySet {
        let mut all: Vec<HostRange> = self.ranges.iter().chain(&other.ranges).copied().collect();
        all.sort_unstable_by_key(|r| r.start);
        let mut ranges: Vec<HostRange> = Vec::with_capacity(all.len());
        for r in all {
            match ranges.last_mut() {
                Some(last) if r.start <= last.end() => {
                    let end = last.end().max(r.end());
                    last.len = end - last.start;
                }
                _ => ranges.push(r),
            }
        }
        DirtySet { ranges }
    }

    /// Total bytes in the set.
    pub fn bytes(&self) -> usize {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// True if `addr` lies in a written run.
    pub fn contains(&self, addr: usize) -> bool {
        let i = self.ranges.partition_point(|r| r.end() <= addr);
        self.ranges.get(i).is_some_and(|r| r.contains(addr))
    }
}

/// One registered range and the index of its first page in the bitmap.
#[derive(Debug, Clone, Copy)]
struct Region {
    range: HostRange,
    first_page: usize,
}

#[derive(Debug)]
struct Shared {
    wp: Arc<WpTracker>,
    precision: Precision,
    page: usize,
    regions: Vec<Region>,
    /// One bit per base page of all regions: written since the last harvest.
    dirty: Mutex<Vec<u64>>,
    stop: AtomicBool,
    faults: AtomicU64,
    /// The handler reads no more events (set under the `dirty` lock by
    /// [`DirtyTracker::suspend`]): faults stay queued for whoever serves them next.
    closed: AtomicBool,
    /// Why the handler stopped, if it stopped on an error.
    failed: Mutex<Option<String>>,
    /// `/proc/self/pagemap`, open for [`Precision::Backing`] (None: no pagemap, every unit is
    /// taken as 4 KiB-mapped).
    pagemap: Option<std::fs::File>,
}

/// Keeps knowing which registered memory was written since the last harvest.
///
/// Dropping it (or [`DirtyTracker::finish`]) stops the handler and releases all memory: nothing
/// stays write-protected with nobody serving its faults.
#[derive(Debug)]
pub struct DirtyTracker {
    shared: Arc<Shared>,
    handler: Option<JoinHandle<()>>,
    /// Dropping releases all memory (false once [`DirtyTracker::suspend`] handed it over).
    owns_protection: bool,
}

/// How long the handler waits for faults before it looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);

impl DirtyTracker {
    /// Protect every range registered with `wp` and start tracking writes at `precision`.
    /// `wp` must not be used by anyone else for protecting or reading faults while this runs.
    pub fn start(wp: Arc<WpTracker>, precision: Precision) -> Result<Self, DirtyError> {
        let shared = Shared::new(wp, precision)?;
        if let Err(e) = shared.wp.protect_all() {
            let _ = shared.wp.unprotect_all();
            return Err(e.into());
        }
        Self::spawn(shared)
    }

    /// Go on tracking from a state left by someone else (a live save that kept what it saved
    /// write-protected): every registered page outside `initial` is write-protected, the pages
    /// of `initial` may not be and count as written. Nothing is protected here; faults already
    /// queued are served by the handler. Nobody else may read `wp`'s faults from now on. On
    /// error everything is released.
    pub fn resume(
        wp: Arc<WpTracker>,
        precision: Precision,
        initial: &[HostRange],
    ) -> Result<Self, DirtyError> {
        let shared = match Shared::new(wp.clone(), precision) {
            Ok(s) => s,
            Err(e) => {
                let _ = wp.unprotect_all();
                return Err(e);
            }
        };
        {
            let mut dirty = shared.lock_dirty();
            for r in initial {
                shared.mark(&mut dirty, *r);
            }
        }
        Self::spawn(shared)
    }

    fn spawn(shared: Arc<Shared>) -> Result<Self, DirtyError> {
        let for_handler = Arc::clone(&shared);
        let handler = std::thread::Builder::new()
            .name("dirty-track".into())
            .spawn(move || for_handler.serve())
            .map_err(|e| {
                let _ = shared.wp.unprotect_all();
                DirtyError::Thread(e)
            })?;
        Ok(DirtyTracker {
            shared,
            handler: Some(handler),
            owns_protection: true,
        })
    }

    /// Stop serving faults and take what was written since the last harvest, protected again:
    /// the handler reads no event from the moment this takes the set's lock (faults stay
    /// queued, their writers blocked), then the taken units are protected again. On success
    /// every registered page is write-protected and the caller owns the protection and the
    /// faults (e.g. a live save, which must serve or release them); call it with the writers
    /// stopped (inside a freeze) for a point-in-time cut. On error everything is released and
    /// tracking is over.
    pub fn suspend(mut self) -> Result<DirtySet, DirtyError> {
        let taken = {
            let mut dirty = self.shared.lock_dirty();
            self.shared.closed.store(true, Ordering::Release);
            let fresh = vec![0; dirty.len()];
            std::mem::replace(&mut *dirty, fresh)
        };
        // The handler reads nothing more; it ends within its poll without touching memory.
        self.shared.stop.store(true, Ordering::Release);
        drop(self.handler.take());
        self.shared.check_handler()?;
        let set = self.shared.runs(&taken);
        for r in &set.ranges {
            // On error `self` drops owning the protection: everything is released.
            self.shared.wp.protect(*r)?;
        }
        self.owns_protection = false;
        Ok(set)
    }

    /// The precision writes are recorded at.
    pub fn precision(&self) -> Precision {
        self.shared.precision
    }

    /// Write-protect faults served so far.
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::Relaxed)
    }

    /// Bytes written since the last harvest (what the next harvest would return), without
    /// changing anything.
    pub fn dirty_bytes(&self) -> usize {
        let bits: usize = self
            .shared
            .lock_dirty()
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum();
        bits * self.shared.page
    }

    /// Take the units written since the last harvest (or the start) and protect them again, so
    /// that later writes count for the next harvest. Safe while writers run (see the module
    /// docs); with the writers stopped it is a point-in-time cut. On error the taken units go
    /// back into the dirty set: nothing is lost.
    pub fn harvest(&self) -> Result<DirtySet, DirtyError> {
        self.shared.check_handler()?;
        let taken = {
            let mut dirty = self.shared.lock_dirty();
            let fresh = vec![0; dirty.len()];
            std::mem::replace(&mut *dirty, fresh)
        };
        let set = self.shared.runs(&taken);
        for r in &set.ranges {
            if let Err(e) = self.shared.wp.protect(*r) {
                // Units already protected again fault on their next write; units not yet
                // protected are still released: either way keep them all in the set.
                let mut dirty = self.shared.lock_dirty();
                for (w, t) in dirty.iter_mut().zip(&taken) {
                    *w |= t;
                }
                return Err(e.into());
            }
        }
        Ok(set)
    }

    /// Count `set` (taken by an earlier [`DirtyTracker::harvest`]) as written again, e.g. when
    /// what that harvest was for did not happen. Its units may be protected or not: a unit
    /// counted as written that was not is only stored once more.
    pub fn put_back(&self, set: &DirtySet) {
        let mut dirty = self.shared.lock_dirty();
        for r in &set.ranges {
            self.shared.mark(&mut dirty, *r);
        }
    }

    /// Stop tracking: stop the handler, release all memory and return what was written since
    /// the last harvest.
    pub fn finish(mut self) -> Result<DirtySet, DirtyError> {
        self.stop_and_release()?;
        self.shared.check_handler()?;
        let dirty = self.shared.lock_dirty().clone();
        Ok(self.shared.runs(&dirty))
    }

    fn stop_and_release(&mut self) -> Result<(), DirtyError> {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        if self.owns_protection {
            self.shared.wp.unprotect_all()?;
        }
        Ok(())
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        let _ = self.stop_and_release();
    }
}

impl Shared {
    fn new(wp: Arc<WpTracker>, precision: Precision) -> Result<Arc<Self>, DirtyError> {
        let page = wp.page_size();
        let mut regions = Vec::new();
        let mut pages = 0;
        for range in wp.registered() {
            regions.push(Region {
                range,
                first_page: pages,
            });
            pages += range.len / page;
        }
        if regions.is_empty() {
            return Err(DirtyError::NothingRegistered);
        }
        Ok(Arc::new(Shared {
            wp,
            precision,
            page,
            regions,
            dirty: Mutex::new(vec![0; pages.div_ceil(64)]),
            stop: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            failed: Mutex::new(None),
            pagemap: match precision {
                Precision::Backing | Precision::BackingBlock(_) => open_self().ok(),
                _ => None,
            },
        }))
    }

    /// Mark every page of `range` (clipped to the registered regions) in `dirty`.
    fn mark(&self, dirty: &mut [u64], range: HostRange) {
        for region in &self.regions {
            let start = range.start.max(region.range.start);
            let end = range.end().min(region.range.end());
            if start >= end {
                continue;
            }
            let first = region.first_page + (start - region.range.start) / self.page;
            let last = region.first_page + (end - region.range.start).div_ceil(self.page);
            for bit in first..last {
                dirty[bit / 64] |= 1 << (bit % 64);
            }
        }
    }

    fn lock_dirty(&self) -> MutexGuard<'_, Vec<u64>> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_handler(&self) -> Result<(), DirtyError> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(why) => Err(DirtyError::HandlerStopped(why.clone())),
            None => Ok(()),
        }
    }

    /// The handler thread: serve faults until told to stop or closed; on an error release
    /// everything (no writer stays blocked) and record why. Events are read under the dirty-set
    /// lock after a look at `closed`, so once [`DirtyTracker::suspend`] closed it under that
    /// lock, this thread reads no event.
    fn serve(&self) {
        let mut faults: Vec<WpFault> = Vec::with_capacity(128);
        while !self.stop.load(Ordering::Acquire) {
            let r = self
                .wp
                .uffd
                .wait_readable(Some(POLL))
                .map_err(WpError::Poll);
            let r = r.and_then(|ready| {
                if !ready {
                    return Ok(());
                }
                let mut dirty = self.lock_dirty();
                if self.closed.load(Ordering::Acquire) {
                    return Ok(());
                }
                faults.clear();
                self.wp.read_faults(&mut faults)?;
                faults
                    .iter()
                    .try_for_each(|f| self.record(&mut dirty, f.addr))
            });
            if let Err(e) = r {
                let _ = self.wp.unprotect_all();
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                return;
            }
        }
    }

    /// Mark the unit around `addr` dirty and release it, both under the dirty-set lock: the
    /// mark comes first, so a write never proceeds unrecorded, and no harvest can take the mark
    /// and protect the unit in between, which the release would undo (the unit would then be
    /// writable with its mark gone).
    fn record(&self, dirty: &mut [u64], addr: usize) -> Result<(), WpError> {
        let page_addr = addr & !(self.page - 1);
        let Some(region) = self.regions.iter().find(|r| r.range.contains(page_addr)) else {
            // Not ours (cannot happen with one owner of the userfaultfd): wake it, change nothing.
            return self.wp.wake(HostRange::new(page_addr, self.page));
        };
        let unit = self.unit_of(region.range, page_addr);
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.mark(dirty, unit);
        self.wp.unprotect(unit, true)
    }

    fn unit_of(&self, range: HostRange, page_addr: usize) -> HostRange {
        let page = HostRange::new(page_addr, self.page);
        let start = (page_addr & !(DIRTY_UNIT - 1)).max(range.start);
        let end = ((page_addr & !(DIRTY_UNIT - 1)) + DIRTY_UNIT).min(range.end());
        let unit = HostRange::new(start, end - start);
        match self.precision {
            Precision::Page => page,
            Precision::Unit => unit,
            Precision::Backing | Precision::BackingBlock(_)
                if unit.len == DIRTY_UNIT && self.huge_mapped(unit) =>
            {
                unit
            }
            Precision::Backing => page,
            Precision::BackingBlock(block) => {
                let block = block.next_power_of_two().clamp(self.page, DIRTY_UNIT);
                let start = (page_addr & !(block - 1)).max(range.start);
                let end = ((page_addr & !(block - 1)) + block).min(range.end());
                HostRange::new(start, end - start)
            }
        }
    }

    /// True if one huge page maps the whole 2 MiB `unit`: PAGEMAP_SCAN reports `PAGE_IS_HUGE`
    /// only for a page mapped by a PMD (or hugetlb) entry, which maps the whole aligned unit, so
    /// asking about the unit's first page is enough.
    fn huge_mapped(&self, unit: HostRange) -> bool {
        let Some(pagemap) = &self.pagemap else {
            return false;
        };
        let q = ScanQuery {
            inverted: 0,
            required: PAGE_IS_HUGE | PAGE_IS_PRESENT,
            anyof: 0,
            return_mask: PAGE_IS_HUGE,
        };
        scan_in(pagemap, unit.start, self.page, q).is_ok_and(|v| !v.is_empty())
    }

    /// The set bits of `bits` as merged address runs.
    fn runs(&self, bits: &[u64]) -> DirtySet {
        let mut ranges: Vec<HostRange> = Vec::new();
        for region in &self.regions {
            let pages = region.range.len / self.page;
            let mut i = 0;
            while i < pages {
                let bit = region.first_page + i;
                let word = bits[bit / 64];
                if word == 0 && bit % 64 == 0 && i + 64 <= pages {
                    i += 64;
                    continue;
                }
                if word & (1 << (bit % 64)) != 0 {
                    let addr = region.range.start + i * self.page;
                    match ranges.last_mut() {
                        Some(last) if last.end() == addr => last.len += self.page,
                        _ => ranges.push(HostRange::new(addr, self.page)),
                    }
                }
                i += 1;
            }
        }
        DirtySet { ranges }
    }
}
