//! Write-protecting all registered memory while its writers still run, so that the moment every
//! writer is stopped (the freeze) costs only what was written since: [`WpTracker::protect_all_armed`].
//!
//! Protecting memory costs per page table entry: a never-touched 4 KiB page gets a uffd-wp
//! marker each, memory of 4 KiB pages (memfd/shmem) an entry each; only huge pages are cheap.
//! Done at the freeze, that cost is downtime, however little of the memory the guest uses. Armed,
//! the same protection is installed while the guest runs, and a short-lived handler thread
//! answers every write fault by unprotecting the whole unit (2 MiB, so a transparent or hugetlbfs
//! huge page stays huge) and remembering it. When every writer is stopped, [`Armed::seal`]
//! serves what is still queued, stops the handler and protects the remembered units again: then
//! every registered page is protected, exactly as after [`WpTracker::protect_all`], and the cost
//! was the units written between arming and sealing.
//!
//! Before sealing, [`Armed::converge`] may protect the remembered units again while the writers
//! still run (new faults are remembered anew), so the set left for the freeze is what was
//! written during that shorter pass.
//!
//! Safety of the scheme:
//! - A page can be unprotected by the handler only, and only after its unit was remembered
//!   (under the lock that a converge pass takes to hand the set over), so every page not protected
//!   at the seal lies in a remembered unit, and the seal protects it.
//! - The handler serves faults until the seal, so a writer blocked in a fault while it is being
//!   stopped (a vCPU that must park) is served and can stop; after the seal it reads no event, so
//!   every later fault stays queued for whoever serves faults next (the live save).
//! - If anything fails, or the caller's closure returns without sealing (or panics), everything
//!   is unprotected and the handler stopped before [`WpTracker::protect_all_armed`] returns: no
//!   writer is left blocked and nothing stays protected.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::{lock, HostRange, WpError, WpFault, WpTracker};

/// The unit the handler unprotects and the seal protects again: a 2 MiB huge page, so transparent
/// and 2 MiB hugetlbfs huge pages stay huge (hugetlbfs memory of larger pages would be refused by
/// the unprotect, and the arming given up with everything released).
pub const ARM_UNIT: usize = 2 << 20;

/// How often the handler looks at its stop flag while no fault arrives.
const HANDLER_POLL: Duration = Duration::from_millis(1);

/// Armed write-protection: all registered memory protected, faults answered by unprotecting and
/// remembering their unit until [`Armed::seal`]. See the module docs.
#[derive(Debug)]
pub struct Armed<'t> {
    tracker: &'t WpTracker,
    state: Mutex<ArmState>,
    /// Set to make the handler return (after the seal, or on the way out).
    stop: AtomicBool,
}

#[derive(Debug, Default)]
struct ArmState {
    /// Start addresses of the units unprotected since they were last protected.
    touched: BTreeSet<usize>,
    /// The handler reads no more events (sealed, or failed).
    closed: bool,
    /// Everything is protected and the caller owns the protection.
    sealed: bool,
    /// What made the handler give up (it unprotected everything first).
    failed: Option<WpError>,
    /// Faults the handler served.
    faults: u64,
}

/// What [`Armed::seal`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SealStats {
    /// Units protected again at the seal.
    pub units: usize,
    /// Faults served while armed (all passes, the seal's drain included).
    pub faults: u64,
}

impl WpTracker {
    /// Write-protects every registered range while writers run and calls `f` with the armed
    /// protection; `f` stops the writers and calls [`Armed::seal`] (e.g. inside a VM freeze).
    ///
    /// If `f` sealed successfully, every registered page is protected when this returns, faults
    /// are left for the caller to serve, and the caller owns the protection (release it on every
    /// path, e.g. with a guard created at the seal). Otherwise (`f` did not seal, or panicked)
    /// everything is unprotected and every blocked writer woken before this returns or unwinds.
    /// Fails only if arming itself failed, before `f` ran; then nothing is protected.
    pub fn protect_all_armed<R>(&self, f: impl FnOnce(&Armed<'_>) -> R) -> Result<R, WpError> {
        let armed = Armed {
            tracker: self,
            state: Mutex::new(ArmState::default()),
            stop: AtomicBool::new(false),
        };
        std::thread::scope(|s| {
            // Stops the handler and releases everything unless sealed, also when unwinding.
            let _end = EndOfArming(&armed);
            std::thread::Builder::new()
                .name("wp-arm".into())
                .spawn_scoped(s, || armed.handle_faults())
                .map_err(WpError::Thread)?;
            // Never-touched pages are caught by the kernel (WP_UNPOPULATED) or populated
            // read-only first, as by `protect_all`.
            self.protect_all()?;
            armed.check_failed()?;
            Ok(f(&armed))
        })
    }
}

/// Ends an arming: unless sealed, unprotects everything (waking every blocked writer) and only
/// then stops the handler, which serves until then.
struct EndOfArming<'a, 't>(&'a Armed<'t>);

impl Drop for EndOfArming<'_, '_> {
    fn drop(&mut self) {
        let armed = self.0;
        let sealed = lock(&armed.state).sealed;
        if !sealed {
            let _ = armed.tracker.unprotect_all();
        }
        armed.stop.store(true, Ordering::SeqCst);
    }
}

impl Armed<'_> {
    /// Protects the units remembered so far again while the writers still run; faults during the
    /// pass are remembered anew. Returns how many units it protected. Cheap when few units were
    /// touched; shortens the seal when many were.
    pub fn converge(&self) -> Result<usize, WpError> {
        let units = {
            let mut st = lock(&self.state);
            if st.closed {
                return Err(self.closed_error(&mut st));
            }
            std::mem::take(&mut st.touched)
        };
        let n = units.len();
        let res = self.protect_units(&units);
        self.check_failed()?;
        if let Err(e) = res {
            // Units left unprotected are not remembered any more: release everything.
            let _ = self.tracker.unprotect_all();
            let mut st = lock(&self.state);
            st.closed = true;
            return Err(e);
        }
        Ok(n)
    }

    /// Units remembered (unprotected by the handler) so far.
    pub fn touched_units(&self) -> usize {
        lock(&self.state).touched.len()
    }

    /// Call once every writer is stopped: serves the faults still queued, stops reading faults,
    /// and protects every remembered unit again. On success every registered page is protected
    /// and later faults stay queued for the caller. On failure everything is unprotected again
    /// (every blocked writer woken).
    pub fn seal(&self) -> Result<SealStats, WpError> {
        let mut st = lock(&self.state);
        if st.closed {
            return Err(self.closed_error(&mut st));
        }
        // Events queued before the seal were raised while armed: served like the handler would.
        let drained = self.serve_queued(&mut st);
        st.closed = true;
        self.stop.store(true, Ordering::SeqCst);
        let units = std::mem::take(&mut st.touched);
        let res = drained.and_then(|()| self.protect_units(&units));
        match res {
            Ok(()) => {
                st.sealed = true;
                Ok(SealStats {
                    units: units.len(),
                    faults: st.faults,
                })
            }
            Err(e) => {
                let _ = self.tracker.unprotect_all();
                Err(e)
            }
        }
    }

    /// The handler thread: serves faults until stopped or closed.
    fn handle_faults(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.tracker.uffd.wait_readable(Some(HANDLER_POLL)) {
                self.fail(WpError::Poll(e));
                return;
            }
            let mut st = lock(&self.state);
            if st.closed {
                return;
            }
            if let Err(e) = self.serve_queued(&mut st) {
                drop(st);
                self.fail(e);
                return;
            }
        }
    }

    /// Reads every queued fault and serves it: remember the unit, then unprotect it (waking the
    /// writer). The caller holds the state lock, so a converge pass never takes the set between
    /// the two.
    fn serve_queued(&self, st: &mut ArmState) -> Result<(), WpError> {
        let mut faults: Vec<WpFault> = Vec::new();
        self.tracker.read_faults(&mut faults)?;
        for f in faults {
            let unit = self.unit_of(f.addr)?;
            st.touched.insert(unit.start);
            st.faults += 1;
            self.tracker.unprotect(unit, true)?;
        }
        Ok(())
    }

    /// The unit holding `addr`, clipped to the registered range holding it.
    fn unit_of(&self, addr: usize) -> Result<HostRange, WpError> {
        let ranges = self.tracker.lock();
        let Some(r) = ranges.iter().find(|r| r.contains(addr)) else {
            return Err(WpError::NotRegistered {
                range: HostRange::new(addr & !(self.tracker.page_size - 1), self.tracker.page_size),
            });
        };
        let start = (addr & !(ARM_UNIT - 1)).max(r.start);
        let end = ((addr & !(ARM_UNIT - 1)) + ARM_UNIT).min(r.end());
        Ok(HostRange::new(start, end - start))
    }

    /// Protects the given units, merging neighbours into one call.
    fn protect_units(&self, units: &BTreeSet<usize>) -> Result<(), WpError> {
        let mut run: Option<HostRange> = None;
        for &start in units {
            let unit = self.unit_of(start)?;
            run = match run {
                Some(r) if r.end() == unit.start => Some(HostRange::new(r.start, r.len + unit.len)),
                Some(r) => {
                    self.tracker.protect_checked(r)?;
                    Some(unit)
                }
                None => Some(unit),
            };
        }
        if let Some(r) = run {
            self.tracker.protect_checked(r)?;
        }
        Ok(())
    }

    /// The handler cannot go on: nobody would serve the next fault, so release everything and
    /// say why.
    fn fail(&self, e: WpError) {
        let mut st = lock(&self.state);
        st.closed = true;
        st.failed.get_or_insert(e);
        drop(st);
        let _ = self.tracker.unprotect_all();
    }

    /// An error if the handler gave up (then everything is released again, in case a protect
    /// pass ran after the handler released it).
    fn check_failed(&self) -> Result<(), WpError> {
        let mut st = lock(&self.state);
        if st.failed.is_none() {
            return Ok(());
        }
        let e = self.closed_error(&mut st);
        drop(st);
        let _ = self.tracker.unprotect_all();
        Err(e)
    }

    fn closed_error(&self, st: &mut ArmState) -> WpError {
        match st.failed.take() {
            Some(e) => WpError::Armed(Box::new(e)),
            None => WpError::ArmClosed,
        }
    }
}
