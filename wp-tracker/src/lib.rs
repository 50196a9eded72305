//! Write-protect tracking of guest RAM ranges with userfaultfd: register, protect, release, read faults.
//!
//! A [`WpTracker`] owns one userfaultfd that handles kernel-mode faults too (KVM writes guest RAM
//! from the kernel), registers host ranges in write-protect mode, write-protects them, and reports
//! every write to a protected page as a [`WpFault`] while the writer (a thread or a vCPU inside
//! KVM_RUN) stays blocked until the page is unprotected.
//!
//! Choices made here:
//! - Faults are synchronous: UFFD_FEATURE_WP_ASYNC is never enabled.
//! - Never-touched pages are caught too: with UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4+) protection
//!   installs markers in empty page table entries; without it every range is populated read-only
//!   (MADV_POPULATE_READ) right before it is protected, as QEMU does.
//! - UFFD_FEATURE_WP_HUGETLBFS_SHMEM is enabled when available, so memfd/shmem and hugetlbfs
//!   memory work as well as anonymous private memory (transparent huge pages stay huge when whole
//!   2 MiB ranges are protected and released).
//! - UFFD_FEATURE_EXACT_ADDRESS is enabled when available: [`WpFault::addr`] is the exact byte
//!   address written; round it down to the page you track.
//! - Dropping the tracker releases everything: every registered range is unprotected (waking
//!   blocked writers) and unregistered. Closing the fd alone would leave uffd-wp bits behind.
//! - Non-cooperative events (fork, remap, remove, unmap) are not enabled: the VMM does not change
//!   guest RAM mappings while a snapshot runs.
//! - Which protected pages may hold data ([`WpTracker::may_hold_data`]) is answered per backing
//!   of memory registered with [`WpTracker::register_memory`]. Page tables alone cannot say it for
//!   shared file memory: protection puts uffd-wp markers into every empty entry, and pagemap shows
//!   a marker the same way whether the file holds a page there or not. So memfd/shmem asks the
//!   page cache (`mincore`, and `SEEK_DATA`, which also sees shmem swapped out), hugetlbfs asks
//!   `mincore` (a page of this mapping, or one being migrated) once it is shown that the file
//!   holds no page this mapping lacks, and private anonymous memory asks pagemap, where a marker
//!   is told apart from a swapped-out page by its swap type.
//!   [`WpTracker::copy_protected`] fills holes of file memory with zeros instead of reading them:
//!   reading a hole through a shared mapping allocates a page (shmem), or a huge page from a
//!   pool that may have none left (hugetlbfs: SIGBUS).
//!
//! - Protecting all memory costs a page table entry per never-touched or 4 KiB page, so a freeze
//!   that protects everything grows with memory the guest never uses. [`WpTracker::protect_all_armed`]
//!   protects everything while the writers still run, answers their faults by unprotecting (and
//!   remembering) whole 2 MiB units, and at the seal, writers stopped, protects again only those
//!   units (`armed.rs`).
//!
//! All methods take `&self`: one thread can read faults while others protect and release.

mod armed;
mod backing;
mod dirty;
mod error;
mod missing;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uffd_sys::host::{page_size, Advice};
use uffd_sys::{
    uffd_msg, Features, OpenError, OpenPath, Userfaultfd, _UFFDIO_WAKE, _UFFDIO_WRITEPROTECT,
    UFFDIO_REGISTER_MODE_WP, UFFDIO_WRITEPROTECT_MODE_DONTWAKE, UFFDIO_WRITEPROTECT_MODE_WP,
    UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_EXACT_ADDRESS, UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_UNPOPULATED, UFFD_PAGEFAULT_FLAG_WP,
};

pub use armed::{Armed, SealStats, ARM_UNIT};
use backing::{backing_of, Backing, HugetlbProofs};
pub use dirty::{DirtyError, DirtySet, DirtyTracker, Precision, DIRTY_UNIT};
pub use error::WpError;
pub use missing::{HugeBlock, MissingError, MissingFault, MissingTracker, HUGE_BLOCK};
pub use uffd_sys::Features as UffdFeatures;

/// A host virtual address range, page aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// Start address (host virtual, page aligned).
    pub start: usize,
    /// Length in bytes (page aligned).
    pub len: usize,
}

impl HostRange {
    /// A range of `len` bytes at `start`.
    pub fn new(start: usize, len: usize) -> Self {
        HostRange { start, len }
    }
    /// End address (exclusive).
    pub fn end(&self) -> usize {
        self.start + self.len
    }
    /// True if `addr` lies inside the range.
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.start && addr - self.start < self.len
    }
    /// True if the two ranges share at least one byte.
    pub fn overlaps(&self, other: &HostRange) -> bool {
        self.start < other.end() && other.start < self.end()
    }
}

impl fmt::Display for HostRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}..{:#x})",
            self.start,
            self.start.wrapping_add(self.len)
        )
    }
}

/// One write-protect fault: a write to a protected page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpFault {
    /// Faulting host address (exact, as the kernel reports it).
    pub addr: usize,
    /// True if this was a write-protect fault (always expected here).
    pub wp: bool,
}

/// Which optional kernel features a [`WpTracker`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpConfig {
    /// Use UFFD_FEATURE_WP_UNPOPULATED when available; when false (or unavailable) ranges are
    /// populated read-only before each protect.
    pub use_wp_unpopulated: bool,
    /// Use UFFD_FEATURE_EXACT_ADDRESS when available (exact fault addresses).
    pub exact_address: bool,
}

impl Default for WpConfig {
    fn default() -> Self {
        WpConfig {
            use_wp_unpopulated: true,
            exact_address: true,
        }
    }
}

/// Write-protect tracker. `Send + Sync`: fault reading and releasing may happen on different threads.
#[derive(Debug)]
pub struct WpTracker {
    /// Guest memory registered through [`WpTracker::register_memory`], held so that its mappings
    /// outlive the registration (`Drop` unregisters everything before any field is dropped).
    kept: Mutex<Vec<vm_memory::GuestMemoryMmap>>,
    uffd: Userfaultfd,
    /// Registered ranges, sorted by start, non-overlapping.
    ranges: Mutex<Vec<HostRange>>,
    /// What backs each region registered through [`WpTracker::register_memory`].
    backings: Mutex<Vec<(HostRange, Backing)>>,
    /// hugetlbfs files shown to hold no page that the registered regions do not map, since the
    /// last protect (see [`WpTracker::may_hold_data`]).
    hugetlb_mapped: Mutex<HugetlbProofs>,
    page_size: usize,
}

/// How many events one read() fetches.
const READ_BATCH: usize = 128;

impl WpTracker {
    /// Open a userfaultfd able to handle kernel-mode faults, negotiate WP features.
    pub fn new() -> Result<Self, WpError> {
        Self::with_config(WpConfig::default())
    }

    /// Like [`WpTracker::new`], choosing which optional features to use.
    pub fn with_config(config: WpConfig) -> Result<Self, WpError> {
        let info = Userfaultfd::probe().map_err(open_error)?;
        let avail = info.available;
        if !avail.contains(UFFD_FEATURE_PAGEFAULT_FLAG_WP) {
            return Err(WpError::NoWriteProtect { available: avail });
        }
        let mut want = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        if config.use_wp_unpopulated {
            want |= UFFD_FEATURE_WP_UNPOPULATED;
        }
        if config.exact_address {
            want |= UFFD_FEATURE_EXACT_ADDRESS;
        }
        let uffd = Userfaultfd::open(want & avail.0).map_err(open_error)?;
        Ok(WpTracker {
            uffd,
            ranges: Mutex::new(Vec::new()),
            backings: Mutex::new(Vec::new()),
            hugetlb_mapped: Mutex::new(HugetlbProofs::default()),
            kept: Mutex::new(Vec::new()),
            page_size: page_size(),
        })
    }

    /// The userfaultfd features in use.
    pub fn features(&self) -> Features {
        self.uffd.features()
    }
    /// Every feature the kernel offers (in use or not).
    pub fn available_features(&self) -> Features {
        self.uffd.api_info().available
    }
    /// True if never-touched pages are protected by the kernel (WP_UNPOPULATED) rather than
    /// populated read-only first.
    pub fn is_wp_unpopulated(&self) -> bool {
        self.features().contains(UFFD_FEATURE_WP_UNPOPULATED)
    }
    /// True if memfd/shmem and hugetlbfs memory can be write-protected.
    pub fn is_wp_hugetlbfs_shmem(&self) -> bool {
        self.features().contains(UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    }
    /// How the userfaultfd was obtained.
    pub fn opened_via(&self) -> OpenPath {
        self.uffd.opened_via()
    }
    /// The base page size ranges must be aligned to.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// The registered ranges, sorted by address.
    pub fn registered(&self) -> Vec<HostRange> {
        self.lock().clone()
    }

    /// Register every region of `mem` for write-protect tracking. Safe: the tracker keeps a
    /// handle on the regions, so the mappings stay alive while registered. On error, the regions
    /// registered by this call are unregistered again.
    pub fn register_memory(&self, mem: &vm_memory::GuestMemoryMmap) -> Result<(), WpError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut done = Vec::new();
        for region in mem.iter() {
            let start = region.as_ptr() as usize;
            let range = HostRange {
                start,
                // usize is 64-bit on every host snapctl supports.
                len: region.len() as usize,
            };
            // SAFETY: `mem` is cloned into `self.kept` below (and on success kept until drop), and a
            // `GuestMemoryMmap` unmaps a region only when its last handle goes; so the range stays
            // mapped until it is unregistered, which `Drop` does before dropping `kept`.
            if let Err(e) = unsafe { self.register(range) } {
                for (r, _) in done {
                    let _ = self.unregister(r);
                }
                return Err(e);
            }
            done.push((range, backing_of(region)));
        }
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(mem.clone());
        lock(&self.backings).extend(done);
        lock(&self.hugetlb_mapped).reset();
        Ok(())
    }

    /// Register a range for write-protect tracking.
    ///
    /// # Safety
    /// The range must stay mapped until it is unregistered or the tracker is dropped.
    pub unsafe fn register(&self, range: HostRange) -> Result<(), WpError> {
        self.check_aligned(range)?;
        let mut ranges = self.lock();
        if let Some(existing) = ranges.iter().find(|r| r.overlaps(&range)) {
            return Err(WpError::AlreadyRegistered {
                range,
                existing: *existing,
            });
        }
        let ioctls = self
            .uffd
            .register(range.start, range.len, UFFDIO_REGISTER_MODE_WP)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOMEM) => WpError::NotMapped { range },
                // Newer kernels answer EINVAL for holes too: tell the two apart.
                Some(libc::EINVAL) if !is_mapped(range) => WpError::NotMapped { range },
                Some(libc::EINVAL) => WpError::UnsupportedMemory {
                    range,
                    shmem_wp: if self.is_wp_hugetlbfs_shmem() {
                        "in use"
                    } else {
                        "not available"
                    },
                },
                Some(libc::EBUSY) => WpError::RegisteredElsewhere { range },
                Some(libc::ESRCH) => WpError::ProcessExiting,
                _ => WpError::Ioctl {
                    op: "UFFDIO_REGISTER",
                    range,
                    source: e,
                },
            })?;
        let needed = (1 << _UFFDIO_WRITEPROTECT) | (1 << _UFFDIO_WAKE);
        if ioctls & needed != needed {
            let _ = self.uffd.unregister(range.start, range.len);
            return Err(WpError::NoWriteProtectOnRange { range, ioctls });
        }
        let at = ranges.partition_point(|r| r.start < range.start);
        ranges.insert(at, range);
        Ok(())
    }

    /// Unprotect (waking writers) and unregister one range previously registered as is.
    pub fn unregister(&self, range: HostRange) -> Result<(), WpError> {
        let mut ranges = self.lock();
        let Some(at) = ranges.iter().position(|r| *r == range) else {
            return Err(WpError::NotRegistered { range });
        };
        self.release(range)?;
        ranges.remove(at);
        lock(&self.backings).retain(|(r, _)| *r != range);
        lock(&self.hugetlb_mapped).reset();
        Ok(())
    }

    /// Unprotect (waking writers) and unregister every range; tries all, returns the first error.
    pub fn unregister_all(&self) -> Result<(), WpError> {
        let mut ranges = self.lock();
        let mut first_err = None;
        let mut kept = Vec::new();
        for range in ranges.drain(..) {
            if let Err(e) = self.release(range) {
                kept.push(range);
                first_err.get_or_insert(e);
            }
        }
        lock(&self.backings).retain(|(r, _)| kept.contains(r));
        lock(&self.hugetlb_mapped).reset();
        *ranges = kept;
        first_err.map_or(Ok(()), Err)
    }

    /// Write-protect every registered range (also never-touched pages).
    pub fn protect_all(&self) -> Result<(), WpError> {
        for range in self.registered() {
            self.protect_checked(range)?;
        }
        Ok(())
    }

    /// Write-protect one range inside a registered range.
    pub fn protect(&self, range: HostRange) -> Result<(), WpError> {
        self.check_covered(range)?;
        self.protect_checked(range)
    }

    /// Release protection on a range; `wake` wakes threads blocked on it.
    pub fn unprotect(&self, range: HostRange, wake: bool) -> Result<(), WpError> {
        self.check_covered(range)?;
        let mode = if wake {
            0
        } else {
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        };
        self.writeprotect(range, mode)
    }

    /// Release protection on every registered range and wake everything.
    pub fn unprotect_all(&self) -> Result<(), WpError> {
        for range in self.registered() {
            self.writeprotect(range, 0)?;
        }
        Ok(())
    }

    /// Wake threads blocked on a range without changing protection.
    pub fn wake(&self, range: HostRange) -> Result<(), WpError> {
        self.check_covered(range)?;
        self.uffd
            .wake(range.start, range.len)
            .map_err(|e| self.ioctl_error("UFFDIO_WAKE", range, e))
    }

    /// Copy the bytes of a write-protected range into `dst` (`dst.len()` must equal
    /// `range.len`) with a plain memcpy, several times faster than volatile guest-memory copies.
    ///
    /// Contract: the caller write-protected `range` and has not released it yet, and does not
    /// release it until this returns. Then nothing can change the bytes while they are copied:
    /// every write, including KVM's kernel-mode writes, blocks on the write-protect fault. If the
    /// contract is broken the copy may be torn, nothing worse: registered ranges stay mapped and
    /// readable. Pages known to hold nothing (see [`WpTracker::may_hold_data`]; memory
    /// registered with [`WpTracker::register_memory`]) are not read but filled with zeros:
    /// reading a hole of memfd/shmem or hugetlbfs memory through the mapping would allocate a
    /// page, one of anonymous memory maps the shared zero page.
    pub fn copy_protected(&self, range: HostRange, dst: &mut [u8]) -> Result<(), WpError> {
        self.check_covered(range)?;
        if dst.len() != range.len {
            return Err(WpError::LengthMismatch {
                range,
                len: dst.len(),
            });
        }
        let Some(runs) = self.data_runs(range) else {
            copy_mapped(range.start, dst);
            return Ok(());
        };
        let mut at = 0;
        for (off, len) in runs {
            dst[at..off].fill(0);
            copy_mapped(range.start + off, &mut dst[off..off + len]);
            at = off + len;
        }
        dst[at..].fill(0);
        Ok(())
    }

    /// Ask the kernel to back `range` (2 MiB aligned, released) with transparent huge pages
    /// again (MADV_COLLAPSE, Linux 6.1+): undoes the split caused by releasing 4 KiB pieces of a
    /// huge page. Contents do not change. Fails (typically EAGAIN/EINVAL) if part of the range
    /// is still write-protected, not populated, or not THP-eligible.
    pub fn collapse_huge(&self, range: HostRange) -> Result<(), WpError> {
        self.check_covered(range)?;
        advise_backing(range, Advice::Collapse)
            .map_err(|source| WpError::Collapse { range, source })
    }

    /// Read pending fault events without blocking; appends to `out`, returns how many.
    pub fn read_faults(&self, out: &mut Vec<WpFault>) -> Result<usize, WpError> {
        let mut buf = [uffd_msg::default(); READ_BATCH];
        let mut total = 0;
        loop {
            let n = self.uffd.read_events(&mut buf).map_err(WpError::Read)?;
            for msg in &buf[..n] {
                if msg.event != UFFD_EVENT_PAGEFAULT {
                    return Err(WpError::UnexpectedEvent { event: msg.event });
                }
                // SAFETY: the kernel filled a PAGEFAULT event, so `pagefault` is the active
                // variant (and all variants are plain integers anyway).
                let pf = unsafe { msg.arg.pagefault };
                out.push(WpFault {
                    addr: pf.address as usize,
                    wp: pf.flags & UFFD_PAGEFAULT_FLAG_WP != 0,
                });
                total += 1;
            }
            if n < buf.len() {
                return Ok(total);
            }
        }
    }

    /// Wait up to `timeout` for fault events; appends to `out`, returns how many (0 on timeout).
    pub fn wait_faults(&self, timeout: Duration, out: &mut Vec<WpFault>) -> Result<usize, WpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.read_faults(out)?;
            if n > 0 {
                return Ok(n);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(0);
            }
            // Another reader may consume the events between poll and read: loop until deadline.
            if !self.uffd.wait_readable(Some(left)).map_err(WpError::Poll)? {
                return Ok(0);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<HostRange>> {
        // The list stays consistent even if a holder panicked: every update is a single step.
        self.ranges.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_aligned(&self, range: HostRange) -> Result<(), WpError> {
        let mask = self.page_size - 1;
        if range.len == 0
            || range.start & mask != 0
            || range.len & mask != 0
            || range.start.checked_add(range.len).is_none()
        {
            return Err(WpError::NotAligned {
                range,
                page_size: self.page_size,
            });
        }
        Ok(())
    }

    /// The range must be aligned and covered by the union of registered ranges.
    fn check_covered(&self, range: HostRange) -> Result<(), WpError> {
        self.check_aligned(range)?;
        let ranges = self.lock();
        let mut cursor = range.start;
        for r in ranges.iter() {
            if r.contains(cursor) {
                cursor = r.end();
                if cursor >= range.end() {
                    return Ok(());
                }
            }
        }
        Err(WpError::NotRegistered { range })
    }

    /// Unprotect (waking writers) and unregister `range` with the kernel; the caller updates the
    /// list of registered ranges.
    fn release(&self, range: HostRange) -> Result<(), WpError> {
        self.writeprotect(range, 0)?;
        self.uffd
            .unregister(range.start, range.len)
            .map_err(|e| WpError::Ioctl {
                op: "UFFDIO_UNREGISTER",
                range,
                source: e,
            })
    }

    fn protect_checked(&self, range: HostRange) -> Result<(), WpError> {
        // A new save: what held during the last one is shown again.
        lock(&self.hugetlb_mapped).reset();
        if !self.is_wp_unpopulated() {
            populate_read(range)?;
        }
        self.writeprotect(range, UFFDIO_WRITEPROTECT_MODE_WP)
    }

    fn writeprotect(&self, range: HostRange, mode: u64) -> Result<(), WpError> {
        loop {
            match self.uffd.writeprotect(range.start, range.len, mode) {
                Ok(()) => return Ok(()),
                // EAGAIN: the address space is changing (only with non-cooperative events);
                // EINTR: a signal. Both are safe to retry.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                    std::thread::yield_now()
                }
                Err(e) => return Err(self.ioctl_error("UFFDIO_WRITEPROTECT", range, e)),
            }
        }
    }

    fn ioctl_error(&self, op: &'static str, range: HostRange, e: io::Error) -> WpError {
        match e.raw_os_error() {
            Some(libc::ENOENT) => WpError::NotRegistered { range },
            Some(libc::EINVAL) => WpError::Misaligned { range },
            Some(libc::ESRCH) => WpError::ProcessExiting,
            _ => WpError::Ioctl {
                op,
                range,
                source: e,
            },
        }
    }
}

impl Drop for WpTracker {
    fn drop(&mut self) {
        // Best effort: nothing to report to from a destructor, and every range is tried.
        let _ = self.unregister_all();
    }
}

impl AsFd for WpTracker {
    /// The userfaultfd, for polling together with other fds (e.g. a cancel eventfd).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

impl AsRawFd for WpTracker {
    fn as_raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update of the tracker's lists is a single step: still consistent after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// memcpy from mapped memory at `src` into `dst`.
fn copy_mapped(src: usize, dst: &mut [u8]) {
    // SAFETY: callers pass `src..src + dst.len()` inside registered ranges, which stay mapped
    // (and readable) while registered; `dst` is a distinct, exclusively borrowed buffer, so the
    // two do not overlap. Under the contract of `copy_protected` no one writes the source during
    // the copy, so it is not torn.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
}

fn open_error(e: OpenError) -> WpError {
    if e.is_unsupported() {
        WpError::NoUserfaultfd
    } else if e.is_permission_denied() {
        WpError::PermissionDenied(e)
    } else {
        WpError::Open(e)
    }
}

/// True if every page of `range` is mapped (msync fails with ENOMEM on holes; MS_ASYNC is a
/// no-op otherwise).
fn is_mapped(range: HostRange) -> bool {
    // SAFETY: msync(MS_ASYNC) neither reads nor writes the memory.
    let r = unsafe { libc::msync(range.start as *mut libc::c_void, range.len, libc::MS_ASYNC) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOMEM)
}

/// Ask the kernel to back every region of `mem` with transparent huge pages (`huge`:
/// MADV_HUGEPAGE) or never with them (`!huge`: MADV_NOHUGEPAGE).
///
/// Only how the memory is backed changes, never its contents or the mapping, so this is safe on
/// memory that is in use (also while registered with a [`WpTracker`]). The advice applies to
/// pages faulted in afterwards and to khugepaged; already populated memory is not collapsed or
/// split right away. Fails with [`WpError::HugePageAdvice`] on the first region the kernel
/// refuses (EINVAL for MADV_HUGEPAGE on a kernel without transparent huge pages); regions
/// advised before it keep their advice.
pub fn advise_huge_pages(mem: &vm_memory::GuestMemoryMmap, huge: bool) -> Result<(), WpError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let advice = if huge {
        Advice::HugePage
    } else {
        Advice::NoHugePage
    };
    for region in mem.iter() {
        let range = HostRange {
            start: region.as_ptr() as usize,
            // usize is 64-bit on every host snapctl supports.
            len: region.len() as usize,
        };
        // `mem` borrows the region, so it stays mapped for the call.
        advise_backing(range, advice).map_err(|source| WpError::HugePageAdvice {
            range,
            huge,
            source,
        })?;
    }
    Ok(())
}

fn populate_read(range: HostRange) -> Result<(), WpError> {
    loop {
        match advise_backing(range, Advice::PopulateRead) {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
            Err(e) => return Err(WpError::Populate { range, source: e }),
        }
    }
}

/// One madvise call on `range` (no retry).
fn advise_backing(range: HostRange, advice: Advice) -> io::Result<()> {
    uffd_sys::host::advise(range.start, range.len, advice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn tracker_is_send_and_sync() {
        assert_send_sync::<WpTracker>();
    }

    /// An anonymous mapping (a [`uffd_sys::host::PageBuf`]) and its start address.
    struct Map(usize, uffd_sys::host::PageBuf);
    impl Map {
        fn anon(len: usize) -> Self {
            let b = uffd_sys::host::PageBuf::new(len).expect("anonymous mapping");
            Map(b.as_ptr() as usize, b)
        }
        fn range(&self) -> HostRange {
            HostRange::new(self.0, self.1.len())
        }
    }

    #[test]
    fn new_uses_write_protect_features_but_not_async() {
        let t = WpTracker::new().unwrap();
        let f = t.features();
        assert!(f.contains(UFFD_FEATURE_PAGEFAULT_FLAG_WP), "{f}");
        assert!(!f.contains(uffd_sys::UFFD_FEATURE_WP_ASYNC), "{f}");
        if t.available_features().contains(UFFD_FEATURE_WP_UNPOPULATED) {
            assert!(t.is_wp_unpopulated());
        }
        let t2 = WpTracker::with_config(WpConfig {
            use_wp_unpopulated: false,
            exact_address: false,
        })
        .unwrap();
        assert!(!t2.is_wp_unpopulated());
        assert!(!t2.features().contains(UFFD_FEATURE_EXACT_ADDRESS));
    }

    #[test]
    fn unaligned_and_empty_ranges_are_refused() {
        let t = WpTracker::new().unwrap();
        let m = Map::anon(8 * 4096);
        for r in [
            HostRange::new(m.0 + 1, 4096),
            HostRange::new(m.0, 100),
            HostRange::new(m.0, 0),
            HostRange::new(usize::MAX & !4095, 8192),
        ] {
            // SAFETY: these ranges are refused before anything is registered.
            let e = unsafe { t.register(r) }.unwrap_err();
            assert!(matches!(e, WpError::NotAligned { .. }), "{r}: {e}");
        }
        assert!(t.registered().is_empty());
    }

    #[test]
    fn unmapped_range_is_reported_as_not_mapped() {
        let t = WpTracker::new().unwrap();
        let m = Map::anon(8 * 4096);
        let r = m.range();
        drop(m);
        // SAFETY: the range is unmapped; registration must fail and register nothing.
        let e = unsafe { t.register(r) }.unwrap_err();
        assert!(matches!(e, WpError::NotMapped { .. }), "{e}");
        assert!(e.to_string().contains("not entirely mapped"));
    }

    #[test]
    fn overlapping_registration_is_refused() {
        let t = WpTracker::new().unwrap();
        let m = Map::anon(8 * 4096);
        // SAFETY: unregistered explicitly before `m` is dropped.
        unsafe { t.register(m.range()) }.unwrap();
        // SAFETY: refused before the kernel is asked.
        let e = unsafe { t.register(HostRange::new(m.0 + 4096, 4096)) }.unwrap_err();
        assert!(matches!(e, WpError::AlreadyRegistered { .. }), "{e}");
        t.unregister(m.range()).unwrap();
        assert!(t.registered().is_empty());
    }

    #[test]
    fn range_registered_with_another_tracker_is_busy() {
        let a = WpTracker::new().unwrap();
        let b = WpTracker::new().unwrap();
        let m = Map::anon(4 * 4096);
        // SAFETY: `m` stays mapped until both trackers released it (explicit unregister below).
        unsafe { a.register(m.range()) }.unwrap();
        // SAFETY: as above.
        let e = unsafe { b.register(m.range()) }.unwrap_err();
        assert!(matches!(e, WpError::RegisteredElsewhere { .. }), "{e}");
        a.unregister_all().unwrap();
    }

    #[test]
    fn operations_outside_registered_ranges_are_refused() {
        let t = WpTracker::new().unwrap();
        let m = Map::anon(8 * 4096);
        // SAFETY: unregistered explicitly before `m` is dropped.
        unsafe { t.register(HostRange::new(m.0, 4 * 4096)) }.unwrap();
        let outside = HostRange::new(m.0 + 2 * 4096, 4 * 4096);
        assert!(matches!(
            t.protect(outside),
            Err(WpError::NotRegistered { .. })
        ));
        assert!(matches!(
            t.unprotect(outside, true),
            Err(WpError::NotRegistered { .. })
        ));
        assert!(matches!(
            t.wake(outside),
            Err(WpError::NotRegistered { .. })
        ));
        t.protect(HostRange::new(m.0 + 4096, 4096)).unwrap();
        t.unprotect(HostRange::new(m.0, 4 * 4096), false).unwrap();
        t.unregister_all().unwrap();
    }

    #[test]
    fn adjacent_registered_ranges_cover_a_spanning_range() {
        let t = WpTracker::new().unwrap();
        let m = Map::anon(8 * 4096);
        // SAFETY: unregistered explicitly before `m` is dropped.
        unsafe { t.register(HostRange::new(m.0 + 4 * 4096, 4 * 4096)) }.unwrap();
        // SAFETY: as above.
        unsafe { t.register(HostRange::new(m.0, 4 * 4096)) }.unwrap();
        assert_eq!(t.registered()[0].start, m.0, "sorted by address");
        t.protect(m.range()).unwrap();
        t.unprotect(m.range(), true).unwrap();
        t.unregister_all().unwrap();
    }

    #[test]
    fn copy_protected_copies_registered_ranges_only() {
        let t = WpTracker::new().unwrap();
        let m = Map::anon(4 * 4096);
        // SAFETY: fresh mapping of our own, written before registration.
        unsafe { std::ptr::write_bytes(m.0 as *mut u8, 7, 4 * 4096) };
        // SAFETY: unregistered explicitly before `m` is dropped.
        unsafe { t.register(HostRange::new(m.0, 2 * 4096)) }.unwrap();
        t.protect_all().unwrap();
        let mut buf = vec![0u8; 2 * 4096];
        t.copy_protected(HostRange::new(m.0, 2 * 4096), &mut buf)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        assert!(matches!(
            t.copy_protected(HostRange::new(m.0, 4096), &mut buf),
            Err(WpError::LengthMismatch { .. })
        ));
        assert!(matches!(
            t.copy_protected(HostRange::new(m.0 + 4096, 2 * 4096), &mut buf),
            Err(WpError::NotRegistered { .. })
        ));
        t.unregister_all().unwrap();
    }

    /// The VmFlags of the mapping holding `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((s, e)) = first.split_once('-') {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
                {
                    inside = s <= addr && addr < e;
                    continue;
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("VmFlags:") {
                    return v.split_whitespace().map(str::to_owned).collect();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn advise_huge_pages_sets_the_advice_and_keeps_contents() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        const MIB: usize = 1 << 20;
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 4 * MIB),
            (GuestAddress(1 << 32), 4 * MIB),
        ])
        .unwrap();
        let gpas = [
            0u64,
            3 * MIB as u64 + 8,
            1 << 32,
            (1 << 32) + 4 * MIB as u64 - 8,
        ];
        for (i, &gpa) in gpas.iter().enumerate() {
            mem.write_obj(0x1234_5678_9abc_def0u64 ^ i as u64, GuestAddress(gpa))
                .unwrap();
        }
        let hosts: Vec<usize> = gpas
            .iter()
            .map(|&g| mem.get_host_address(GuestAddress(g)).unwrap() as usize)
            .collect();
        for huge in [true, false, true] {
            advise_huge_pages(&mem, huge).unwrap();
            let (set, clear) = if huge { ("hg", "nh") } else { ("nh", "hg") };
            for &h in &hosts {
                let flags = vm_flags(h);
                assert!(flags.iter().any(|f| f == set), "{huge}: {flags:?}");
                assert!(!flags.iter().any(|f| f == clear), "{huge}: {flags:?}");
            }
            for (i, &gpa) in gpas.iter().enumerate() {
                let v: u64 = mem.read_obj(GuestAddress(gpa)).unwrap();
                assert_eq!(v, 0x1234_5678_9abc_def0u64 ^ i as u64);
            }
        }
        // Also while registered and protected: the advice neither fails nor unprotects.
        let t = WpTracker::new().unwrap();
        t.register_memory(&mem).unwrap();
        t.protect_all().unwrap();
        advise_huge_pages(&mem, false).unwrap();
        for r in t.registered() {
            let left = uffd_sys::pagemap::wp_protected_regions(r.start, r.len).unwrap();
            assert!(!left.is_empty(), "protection lost on {r}");
        }
        t.unregister_all().unwrap();
    }

    #[test]
    fn no_events_means_empty_reads_and_timeouts() {
        let t = WpTracker::new().unwrap();
        let mut out = Vec::new();
        assert_eq!(t.read_faults(&mut out).unwrap(), 0);
        let start = Instant::now();
        assert_eq!(
            t.wait_faults(Duration::from_millis(50), &mut out).unwrap(),
            0
        );
        assert!(start.elapsed() >= Duration::from_millis(45));
        assert!(out.is_empty());
    }
}
